"""The CUDA path: equivalence, local_step gradients, AMP (bf16, fp16 + GradScaler), checkpointing, save/load, bench
and a short `auglocal train`, on a GPU. Skipped where torch sees no CUDA device; run with ``pytest -m cuda``
(benchmarks/gpu.sh does). CI never needs a GPU."""
import copy

import pytest
import torch
import yaml
from click.testing import CliRunner

import auglocal_fx
from _models import tiny_net
from auglocal_fx import io as artifact_io
from auglocal_fx.bench import BenchConfig, run_benchmark
from auglocal_fx.checkpointing import CheckpointedBP

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def cpu_lm():
    torch.manual_seed(0)
    return auglocal_fx.convert(tiny_net(num_classes=10), layers=4, aux_depth=2, input_size=SIZE)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, *SIZE, generator=g), torch.randint(0, 10, (8,), generator=g)


def _close(a, b, what, rtol=1e-3, atol=1e-4):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=rtol, atol=atol, msg=what)


def test_eval_equivalence_on_cuda(batch):
    torch.manual_seed(0)
    model = torchvision_resnet18()
    lm = auglocal_fx.convert(model, layers=9, input_size=SIZE).cuda().eval()
    model = model.cuda().eval()
    x = batch[0].cuda()
    with torch.no_grad():
        _close(lm(x), model(x), "LocalModel vs original on CUDA", rtol=1e-4, atol=1e-5)


def torchvision_resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def test_local_step_gradients_match_cpu(cpu_lm, batch):
    x, y = batch
    cpu, gpu = copy.deepcopy(cpu_lm).train(), copy.deepcopy(cpu_lm).cuda().train()
    losses_cpu = cpu.local_step(x, y)
    losses_gpu = gpu.local_step(x.cuda(), y.cuda())
    for k, (a, b) in enumerate(zip(losses_cpu, losses_gpu)):
        _close(b, a, f"loss {k}")
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        assert b.grad is not None, name
        _close(b.grad, a.grad, name, rtol=1e-2, atol=1e-4)


def test_checkpointed_bp_equals_bp_on_cuda(cpu_lm, batch):
    x, y = batch[0].cuda(), batch[1].cuda()
    bp, ck = copy.deepcopy(cpu_lm).cuda().train(), copy.deepcopy(cpu_lm).cuda().train()
    bp.bp_step(x, y)
    CheckpointedBP(ck, segments=2).step(x, y)
    for (name, a), b in zip(bp.named_parameters(), ck.parameters()):
        if a.grad is not None:
            _close(b.grad, a.grad, name, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(bp.named_buffers(), ck.buffers()):
        _close(b, a, name, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_local_step(cpu_lm, batch):
    lm = copy.deepcopy(cpu_lm).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = lm.local_step(batch[0].cuda(), batch[1].cuda())
    assert all(torch.isfinite(v) for v in losses)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in lm.parameters() if p.requires_grad)


def test_fp16_with_grad_scaler_per_layer(cpu_lm, batch):
    lm = copy.deepcopy(cpu_lm).cuda().train()
    before = [p.detach().clone() for p in lm.parameters()]
    scaler = torch.amp.GradScaler("cuda")
    opt = auglocal_fx.PerLayerOptimizer(lm, lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), scaler=scaler)
    x, y = batch[0].cuda(), batch[1].cuda()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            losses = lm.local_step(x, y, scaler=scaler, after_backward=opt.after_backward)
        scaler.update()
        assert all(torch.isfinite(v) for v in losses)
    assert all(p.grad is None for p in lm.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, lm.parameters()))
    assert changed == len(before)


def test_save_load_of_a_model_trained_on_cuda(cpu_lm, batch, tmp_path):
    lm = copy.deepcopy(cpu_lm).cuda().train()
    opt = torch.optim.SGD(lm.parameters(), lr=0.05, momentum=0.9)
    x, y = batch[0].cuda(), batch[1].cuda()
    for _ in range(2):
        opt.zero_grad()
        lm.local_step(x, y)
        opt.step()
    lm.eval()
    before = [t.cpu() for t in lm.layerwise_logits(x)]
    artifact_io.save(lm, tmp_path / "a")
    loaded = artifact_io.load(tmp_path / "a").eval()  # tensors come back on the CPU
    after = loaded.layerwise_logits(x.cpu())
    for k, (a, b) in enumerate(zip(before, after)):
        _close(b, a, f"layer {k} logits after save/load", rtol=1e-4, atol=1e-5)


def test_bench_on_cuda(cpu_lm):
    config = BenchConfig(batch=8, steps=2, warmup=1, device="cuda", methods=("bp", "checkpoint", "auglocal"),
                         cudnn_benchmark=True)
    report = run_benchmark(copy.deepcopy(cpu_lm), config)
    for name in report["methods"]:
        mem = report[name]["memory"]
        assert mem["measured_by"] == "cuda.max_memory_allocated" and mem["peak"] == mem["measured_peak"]
    assert report["checkpoint"]["memory"]["state"] == report["bp"]["memory"]["state"]
    assert "gpu" in report["machine"] and torch.backends.cudnn.benchmark is False


def test_short_train_run_on_cuda(tmp_path):
    from auglocal_fx.cli.main import main
    from test_train import tiny

    recipe = tiny(name="tiny-cuda", device="cuda", amp="bf16", batch_size=64, deterministic=False, num_threads=None)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["train", str(path), "-q", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "run").iterdir())
