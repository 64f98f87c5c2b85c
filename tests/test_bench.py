"""auglocal_fx.bench and `auglocal bench`: tiny models, batch 4, one step; every figure checked against its definition."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import auglocal_fx
from _models import tiny_net
from auglocal_fx.bench import (
    BenchConfig,
    count_checkpoint_flops,
    LayerwiseOptimizer,
    StepMemoryTracker,
    count_step_flops,
    format_report,
    make_optimizer,
    parse_bytes,
    run_benchmark,
    winners,
    write_json,
    write_plot,
)
from auglocal_fx.checkpointing import CheckpointedBP


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return auglocal_fx.convert(tiny_net(), layers=4, aux_depth=2, pyramid=0.0, input_size=(3, 16, 16))


@pytest.fixture(scope="module")
def report(lm):
    return run_benchmark(copy.deepcopy(lm), BenchConfig(batch=4, steps=2, warmup=1))


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == 1_500_000_000
    for bad in ("", "8XB", "-1GiB", "GiB", "nan"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_flops_split_and_linear_in_batch(lm):
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    f2, f4 = count_step_flops(lm, x[:2], y[:2]), count_step_flops(lm, x, y)
    assert {k: 2 * v for k, v in f2.items()} == f4
    fwd_backbone = sum(layer.flops for layer in lm.plan.layers) * 4
    fwd_aux = sum(a.flops for a in lm.plan.aux) * 4
    # A training step is forward + backward: 2-3x the forward FLOPs (the first conv of each local layer computes
    # no input gradient, so AugLocal's backbone share is below BP's).
    assert 2 * fwd_backbone <= f4["local_backbone"] < f4["bp"] <= 3 * fwd_backbone
    assert 2 * fwd_aux <= f4["local_aux"] <= 3 * fwd_aux
    assert all(p.grad is None for p in lm.parameters())


def test_layerwise_optimizer_equals_one_optimizer(lm):
    """Stepping each layer right after its backward is the same update as one step after the whole local step."""
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    cfg = BenchConfig(batch=4)
    a, b = copy.deepcopy(lm), copy.deepcopy(lm)
    layerwise = LayerwiseOptimizer(a, lambda params: make_optimizer(params, cfg))
    single = make_optimizer(list(b.parameters()), cfg)
    for _ in range(2):  # the second step uses the momentum buffers
        a.local_step(x, y, after_backward=layerwise.after_backward)
        assert all(p.grad is None for p in a.parameters())
        single.zero_grad(set_to_none=True)
        b.local_step(x, y)
        single.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_layerwise_optimizer_refuses_tied_weights(lm):
    tied = copy.deepcopy(lm)
    tied.aux[0].body[-1] = tied.layers[-1]  # a module shared by two local layers' parameter groups
    with pytest.raises(ValueError, match="shared"):
        LayerwiseOptimizer(tied, lambda params: make_optimizer(params, BenchConfig(batch=4)))


def test_step_memory_tracker_counts_grads_and_excludes_input():
    lin = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    with StepMemoryTracker(list(lin.parameters()), exclude=[x]) as tracker:
        h = torch.relu(lin(x))  # relu saves its output; linear saves x (excluded)
        h.sum().backward()
    assert tracker.peak_bytes == 8 * 64 * 4
    assert tracker.peak_grad_bytes == (64 * 64 + 64) * 4
    tracker.grads_released()
    assert tracker.grad_bytes == 0


def test_report_figures(report, lm):
    bp, al = report["bp"], report["auglocal"]
    for method in (bp, al):
        t = method["time"]
        assert len(t["times_s"]) == 2 and t["min_s"] <= t["median_s"] <= t["max_s"]
        assert t["images_per_s"] == pytest.approx(4 / t["median_s"])
    # parameter state, exactly: BP owns the backbone, AugLocal the backbone and the aux nets; SGD momentum = 1 buffer
    bb = sum(p.numel() for p in lm.backbone_parameters()) * 4
    aux = sum(p.numel() for p in lm.aux_parameters()) * 4
    assert bp["memory"]["state"]["aux_weights"] == 0
    assert bp["memory"]["state"]["backbone_optimizer"] == bb
    assert al["memory"]["state"]["aux_optimizer"] == aux
    assert al["memory"]["state"]["backbone_optimizer"] == bb
    assert al["memory"]["state"]["aux_weights"] >= aux  # + BatchNorm buffers
    # nothing crosses a layer boundary, and the activation peak is the largest layer + aux net footprint
    assert al["memory"]["carried_across_layers"] == 0
    assert al["memory"]["activations_peak"] == al["memory"]["local_limit"]
    assert len(al["memory"]["layer_windows"]) == lm.plan.num_layers
    # per-layer optimizer step: never more gradients alive than the largest local parameter group
    largest_group = max(sum(p.numel() for p in lm.local_parameters(k)) for k in range(4)) * 4
    assert al["memory"]["grads_peak"] <= largest_group
    assert bp["memory"]["grads_peak"] == bb
    assert al["memory"]["accounted_peak"] == (al["memory"]["state"]["total"] + al["memory"]["batch_bytes"]
                                              + al["memory"]["step_tracked_peak"])
    r = report["ratios"]
    assert r["step_time"] == pytest.approx(al["time"]["median_s"] / bp["time"]["median_s"])
    assert r["flops_per_step"] == pytest.approx(report["flops"]["local_total"] / report["flops"]["bp"])
    assert r["step_time_vs_ideal"] == pytest.approx(r["step_time"] / r["flops_per_step"])
    assert r["activations"] == pytest.approx(al["memory"]["activations_peak"] / bp["memory"]["activations_peak"])
    json.dumps(report)  # JSON-able


def test_measured_peak_on_linux(report):
    mem = report["auglocal"]["memory"]
    if mem.get("measured_by") is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert mem["measured_peak"] == mem["state"]["total"] + mem["batch_bytes"] + mem["measured_step_increase"]
    assert mem["peak"] == mem["measured_peak"]


def test_global_step_keeps_every_gradient(lm):
    rep = run_benchmark(copy.deepcopy(lm), BenchConfig(batch=4, steps=1, warmup=1, layer_step=False, run_bp=False))
    total = sum(p.numel() for p in lm.parameters()) * 4
    assert rep["auglocal"]["memory"]["grads_peak"] == total
    assert "ratios" not in rep


def test_outputs(report, tmp_path):
    text = format_report(report)
    assert "AugLocal/BP" in text and "compute-proportional ideal" in text and "peak memory" in text
    write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "auglocal-fx-bench"
    write_plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench(tmp_path):
    from auglocal_fx.cli.main import main

    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", "auglocal:resnet8", "--layers", "3", "--batch", "4", "--input-size",
                                       "3,16,16", "--steps", "1", "--warmup", "0", "--no-memory-probe", "--json", str(out),
                                       "-q"])
    assert result.exit_code == 0, result.output
    assert "AugLocal/BP" in result.output
    doc = json.loads(out.read_text())
    assert doc["config"]["layers"] == 3 and doc["config"]["batch"] == 4


def test_cli_bench_errors():
    from auglocal_fx.cli.main import main

    result = CliRunner().invoke(main, ["bench", "auglocal:resnet8", "--layers", "3"])
    assert result.exit_code == 2 and "--batch" in result.output
    result = CliRunner().invoke(main, ["plan", "auglocal:resnet8", "--batch", "4", "--memory-budget", "lots"])
    assert result.exit_code == 2 and "memory size" in result.output


# ------------------------------------------------------------------------------------------------ peers


@pytest.fixture(scope="module")
def peers(lm):
    config = BenchConfig(batch=4, steps=2, warmup=0, methods=("bp", "checkpoint", "auglocal"), checkpoint_segments=2)
    return run_benchmark(copy.deepcopy(lm), config)


def test_checkpoint_flops_are_bp_plus_the_recomputed_forward(lm):
    from auglocal_fx._shapes import total_flop_counter

    model = copy.deepcopy(lm)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))
    step = CheckpointedBP(model, ranges=[(0, 1), (1, 3), (3, 4)])
    forward = []
    h = x
    for layer in model.layers:
        counter = total_flop_counter()
        with counter, torch.no_grad():
            h = layer(h)
        forward.append(int(counter.get_total_flops()))
    bp = count_step_flops(model, x, y)["bp"]
    assert count_checkpoint_flops(step, x, y) == bp + sum(forward[:3])  # the last segment is not recomputed
    assert all(p.grad is None for p in model.parameters())


def test_peer_report(peers, lm):
    assert peers["methods"] == ["bp", "checkpoint", "auglocal"]
    bp, ck = peers["bp"], peers["checkpoint"]
    # checkpointing owns what BP owns: the backbone, its optimizer state, and gradients of every parameter
    assert ck["memory"]["state"] == bp["memory"]["state"]
    assert ck["memory"]["grads_peak"] == bp["memory"]["grads_peak"]
    assert ck["flops_per_step"]["backbone"] > bp["flops_per_step"]["backbone"] and ck["flops_per_step"]["aux"] == 0
    assert ck["checkpoint"]["segments"] == 2 and ck["checkpoint"]["ranges"][-1][1] == lm.plan.num_layers
    # the saved-tensor hooks see the stored segment inputs and the last segment only: fewer bytes than BP's
    assert ck["memory"]["activations_peak"] < bp["memory"]["activations_peak"]
    for name in ("checkpoint", "auglocal"):
        r = peers["vs_bp"][name]
        m = peers[name]
        assert r["step_time"] == pytest.approx(m["time"]["median_s"] / bp["time"]["median_s"])
        assert r["peak_memory"] == pytest.approx(m["memory"]["peak"] / bp["memory"]["peak"])
        assert r["memory_x_time"] == pytest.approx(r["peak_memory"] * r["step_time"])
        total = m["flops_per_step"]["backbone"] + m["flops_per_step"]["aux"]
        assert r["flops_per_step"] == pytest.approx(total / bp["flops_per_step"]["backbone"])
    assert peers["ratios"] == peers["vs_bp"]["auglocal"]  # the AugLocal/BP figures keep their old place
    win = winners(peers)
    assert set(win) == {"memory", "time", "memory x time"} and set(win.values()) <= set(peers["methods"])
    text = format_report(peers)
    assert "checkpoint/BP" in text and "AugLocal/BP" in text and "lowest: memory" in text
    json.dumps(peers)


def test_peer_plot(peers, tmp_path):
    write_plot(peers, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


OTHER_RULES = [r for r in auglocal_fx.list_rules() if r != "auglocal"]


@pytest.mark.parametrize("rule", OTHER_RULES)
def test_every_rule_is_a_method(lm, rule):
    rep = run_benchmark(copy.deepcopy(lm), BenchConfig(batch=4, steps=1, warmup=0, methods=("bp", rule)))
    m = rep[rule]
    assert m["flops_per_step"]["aux"] > 0 and m["memory"]["carried_across_layers"] == 0
    assert len(m["memory"]["layer_windows"]) == lm.plan.num_layers
    assert m["memory"]["state"]["aux_weights"] > 0 and rule in rep["vs_bp"]


def test_unknown_method(lm):
    with pytest.raises(ValueError, match="unknown method 'lion'"):
        run_benchmark(copy.deepcopy(lm), BenchConfig(batch=4, steps=1, warmup=0, methods=("bp", "lion")))
    with pytest.raises(ValueError, match="at least one"):
        BenchConfig(batch=4, methods=("bp",), run_bp=False)


def test_cli_bench_methods(tmp_path):
    from auglocal_fx.cli.main import main

    out = tmp_path / "b.json"
    result = CliRunner().invoke(main, ["bench", "auglocal:resnet8", "--layers", "4", "--batch", "4", "--input-size",
                                       "3,16,16", "--steps", "1", "--warmup", "0", "--no-memory-probe", "--methods",
                                       "bp,checkpoint", "--checkpoint-segments", "3", "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "checkpoint/BP" in result.output
    doc = json.loads(out.read_text())
    assert doc["methods"] == ["bp", "checkpoint"] and doc["checkpoint"]["checkpoint"]["segments"] == 3
