"""The training engine on tiny runs (digits, ResNet-8 at width 4, a few batches): outputs, resume, Ctrl-C, errors."""
import importlib
import json
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from auglocal_fx.train import TrainError, train
from auglocal_fx.train import _run
from auglocal_fx.train._checkpoint import load_checkpoint

TIMING = {"epoch_time", "train_throughput", "elapsed", "peak_mem_mb"}


def tiny(**changes):
    recipe = {
        "name": "tiny",
        "model": {"name": "resnet8", "kwargs": {"width": 4}},
        "convert": {"layers": 3, "aux_depth": 2},
        "data": {"name": "digits", "train_subset": 192, "eval_subset": 96, "augment": "crop"},  # crop draws RNG
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine"},
        "epochs": 2,
        "batch_size": 32,
        "seed": 1,
        "device": "cpu",
        "num_threads": 1,
        "deterministic": True,
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            recipe[section] = {**recipe.get(section, {}), name: value}
        else:
            recipe[section] = value
    return recipe


def _strip(history):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


def _assert_same_weights(dir_a, dir_b):
    a = load_checkpoint(Path(dir_a) / _run.CHECKPOINT_FILE)
    b = load_checkpoint(Path(dir_b) / _run.CHECKPOINT_FILE)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _strip(a["history"]) == _strip(b["history"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted two-epoch AugLocal run that the resume tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    return train(tiny(), output_dir=out, quiet=True), out


def test_outputs_of_a_run(reference_run):
    result, out = reference_run
    run = result["auglocal"]
    assert not result.interrupted and run.epochs == 2 and 0 <= run.top1 <= 100
    assert run.best_top1 == max(h["eval_top1"] for h in run.history)
    assert len(run.layer_acc) == 3 and run.layer_acc[-1] == run.top1
    rundir = out / "auglocal"
    for name in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "curves.png", "summary.json", "recipe.yaml"):
        assert (rundir / name).is_file(), name
    rows = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and len(rows[0]["train_layer_loss"]) == 3
    header = (rundir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "eval_top1", "layer_acc_0", "layer_acc_2", "train_layer_loss_1", "lr"} <= set(header)
    state = load_checkpoint(rundir / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "history"} <= set(state)
    assert state["next_epoch"] == 2 and state["next_step"] == 0
    assert (rundir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "tiny"


def test_artifact_is_the_convert_format(reference_run):
    from auglocal_fx.io import load

    result, out = reference_run
    artifact = result["auglocal"].artifact
    assert artifact == out / "auglocal" / "model"
    lm = load(artifact).eval()
    state = load_checkpoint(out / "auglocal" / "checkpoint.pt")["model"]
    for key, value in lm.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_resume_after_an_epoch_equals_uninterrupted(reference_run, tmp_path, monkeypatch):
    stop = threading.Event()
    original = _run.MetricsWriter.write

    def write_then_stop(self, history):
        original(self, history)
        stop.set()  # ask to stop right after the first epoch's metrics

    monkeypatch.setattr(_run.MetricsWriter, "write", write_then_stop)
    first = train(tiny(), output_dir=tmp_path, quiet=True, stop=stop)
    assert first.interrupted and first["auglocal"].epochs == 1
    assert load_checkpoint(tmp_path / "auglocal" / "checkpoint.pt")["next_epoch"] == 1
    monkeypatch.setattr(_run.MetricsWriter, "write", original)
    second = train(tiny(), output_dir=tmp_path, resume=True, quiet=True)
    assert not second.interrupted and second["auglocal"].epochs == 2
    _assert_same_weights(reference_run[1] / "auglocal", tmp_path / "auglocal")
    assert second["auglocal"].top1 == reference_run[0]["auglocal"].top1


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(reference_run, tmp_path, monkeypatch):
    original = _run.Run._step
    calls = {"n": 0}

    def step_then_interrupt(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2 (6 batches an epoch), batch 2: a real SIGINT, as Ctrl-C sends
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(_run.Run, "_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), output_dir=tmp_path, quiet=True)
    state = load_checkpoint(tmp_path / "auglocal" / "checkpoint.pt")
    assert (state["next_epoch"], state["next_step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(_run.Run, "_step", original)
    result = train(tiny(), output_dir=tmp_path, resume=True, quiet=True)
    assert result["auglocal"].epochs == 2
    _assert_same_weights(reference_run[1] / "auglocal", tmp_path / "auglocal")


def test_existing_run_is_not_overwritten_and_recipe_changes_refuse_resume(reference_run):
    _, out = reference_run
    with pytest.raises(TrainError, match="already holds a run.*--resume"):
        train(tiny(), output_dir=out, quiet=True)
    with pytest.raises(TrainError, match=r"optimizer\.lr \(0\.05 -> 0\.1\)"):
        train(tiny(optimizer__lr=0.1), output_dir=out, resume=True, quiet=True)
    # resuming a finished run trains nothing more and reports the same figures
    again = train(tiny(), output_dir=out, resume=True, quiet=True)
    assert again["auglocal"].epochs == 2 and again["auglocal"].top1 == reference_run[0]["auglocal"].top1


def test_both_rules_side_by_side(tmp_path):
    result = train(tiny(rule=["auglocal", "bp"], epochs=1, limit_train_batches=3), output_dir=tmp_path, quiet=True)
    assert list(result.runs) == ["auglocal", "bp"]
    bp = result["bp"]
    assert bp.layer_acc is None and 0 <= bp.top1 <= 100 and bp.history[0]["train_layer_loss"] is None
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "bp" / "model").is_dir()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"auglocal", "bp"}
    # both rules start from the same initial weights (same seed), so the comparison is fair
    auglocal_state = load_checkpoint(tmp_path / "auglocal" / "checkpoint.pt")
    assert auglocal_state["history"][0]["train_samples"] == bp.history[0]["train_samples"] == 96


def test_diverging_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(_run.Run, "_step", lambda self, x, y, params: torch.full((3,), float("nan")))
    with pytest.raises(TrainError, match="loss of layer 0 is nan at epoch 1.*Lower optimizer.lr"):
        train(tiny(epochs=1), output_dir=tmp_path, quiet=True)


def test_pretrained_file_and_missing_data(tmp_path):
    from safetensors.torch import save_file

    from auglocal_fx.hub import create_model

    weights = tmp_path / "r8.safetensors"
    donor = create_model("resnet8", num_classes=10, in_chans=1, width=4)
    save_file(donor.state_dict(), str(weights))
    recipe = tiny(epochs=1, limit_train_batches=1, optimizer__lr=1e-12, optimizer__weight_decay=0.0,
                  model={"name": "resnet8", "kwargs": {"width": 4}, "pretrained_file": str(weights)})
    train(recipe, output_dir=tmp_path / "run", quiet=True)
    state = load_checkpoint(tmp_path / "run" / "auglocal" / "checkpoint.pt")["model"]
    torch.testing.assert_close(state["layers.0.conv1.weight"], donor.conv1.weight, rtol=0, atol=1e-9)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny(model={"name": "resnet8", "pretrained_file": str(tmp_path / "nope.pt")}),
              output_dir=tmp_path / "x", quiet=True)
    from auglocal_fx.data import DataError

    with pytest.raises(DataError, match="download"):
        train(tiny(data={"name": "cifar10", "root": str(tmp_path / "none")}), output_dir=tmp_path / "y", quiet=True)


def test_cli_train(tmp_path):
    try:
        module = importlib.import_module("auglocal_fx.cli.train")
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        module = importlib.import_module("cli.train")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(epochs=1, limit_train_batches=2)))
    runner = CliRunner()
    result = runner.invoke(module.train_command, [str(path), "-q", "-o", str(tmp_path / "out"), "--set", "seed=2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("auglocal: test top-1 ")
    again = runner.invoke(module.train_command, [str(path), "-q", "-o", str(tmp_path / "out")])
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "--resume" in again.output


def test_bf16_channels_last_and_friends_on_cpu(tmp_path):
    recipe = tiny(epochs=1, limit_train_batches=2, limit_eval_batches=1, amp="bf16", channels_last=True,
                  label_smoothing=0.1, grad_clip=1.0, schedule={"name": "step", "decay_epochs": 1},
                  optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.99]})
    run = train(recipe, output_dir=tmp_path, quiet=True)["auglocal"]
    assert run.history[0]["train_samples"] == 64 and run.history[0]["eval_top1"] is not None
    assert all(v == v for v in run.history[0]["train_layer_loss"])  # finite


def test_loss_display_is_compact():
    from auglocal_fx.train._progress import format_losses

    assert format_losses([2.0, 1.5, 1.25]) == "L0 2.000 L1 1.500 L2 1.250"
    shown = format_losses([float(k) for k in range(55)]).split()
    assert len(shown) == 16 and shown[0] == "L0" and shown[-2] == "L54"  # 8 of 55 layers, first and last kept


def test_resuming_does_not_fetch_pretrained_weights(tmp_path, monkeypatch):
    """The checkpoint replaces the starting weights: a resumed run must not ask the hub for them (offline)."""
    import auglocal_fx.hub as hub

    asked = []
    original = hub.create_model

    def create_model(name, *, pretrained=False, pretrained_file=None, **kwargs):
        asked.append(pretrained)
        return original(name, **kwargs)  # resnet8 has no published weights: build it fresh either way

    monkeypatch.setattr(hub, "create_model", create_model)
    rec = tiny(epochs=2, limit_train_batches=2, model={"name": "resnet8", "kwargs": {"width": 4}, "pretrained": True})
    stop = threading.Event()
    original_write = _run.MetricsWriter.write

    def write_then_stop(self, history):
        original_write(self, history)
        stop.set()

    monkeypatch.setattr(_run.MetricsWriter, "write", write_then_stop)
    assert train(rec, output_dir=tmp_path, quiet=True, stop=stop).interrupted
    monkeypatch.setattr(_run.MetricsWriter, "write", original_write)
    train(rec, output_dir=tmp_path, quiet=True, resume=True)
    assert asked == [True, False]
