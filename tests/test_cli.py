"""The ``auglocal`` command line, through click's CliRunner: every command, its output and its error paths."""
import json
import shutil
import sys
import textwrap
import uuid

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from auglocal_fx.cli import main as cli_main
from auglocal_fx.cli.main import main, parse_input_size
from auglocal_fx.hub import create_model
from auglocal_fx.io import load

SMALL = ["--input-size", "3,32,32", "--num-classes", "10"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    return lines


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "r8"
    result = run("convert", "resnet8", "--layers", 3, *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output.startswith("auglocal-fx ") and f"torch {torch.__version__.split('+')[0]}" in result.output


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["export"]])
def test_help_has_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and "auglocal " in result.output
    assert run(*command, "-h").output == result.output


def test_convert_writes_the_artifact_and_prints_the_table(converted):
    out, output = converted
    assert "3 local layers over 4 units" in output
    for header in ("layer", "out shape", "aux depth", "aux net units", "aux params"):
        assert header in output
    assert f"wrote {out}/model.safetensors" in output
    doc = json.loads((out / "auglocal.json").read_text())
    assert doc["source"] == {"name": "auglocal:resnet8", "kwargs": {"num_classes": 10}}
    assert doc["plan"]["config"]["input_size"] == [3, 32, 32]
    lm = load(out)
    assert lm.plan.num_layers == 3 and lm(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convert_options_reach_the_plan(tmp_path):
    result = run("convert", "resnet8", "--layers", 2, "--aux-depth", 1, "--pyramid", 0, "--aux-init", "fresh",
                 *SMALL, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    config = load(tmp_path / "a").plan.config
    assert (config["layers"], config["aux_depth"], config["pyramid"], config["aux_init"]) == (2, 1, 0.0, "fresh")


def test_dry_run_and_no_output_write_nothing(tmp_path):
    result = run("convert", "resnet8", "--layers", 2, *SMALL, "-o", tmp_path / "a", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.output and not (tmp_path / "a").exists()
    result = run("convert", "resnet8", "--layers", 2, *SMALL)
    assert result.exit_code == 0 and "add -o DIR" in result.output


def test_convert_with_explicit_cuts(tmp_path):
    inspected = run("inspect", "resnet8", *SMALL, "--json")
    cuts = json.loads(inspected.output)["valid_cuts"]
    result = run("convert", "resnet8", "--cuts", cuts[0], *SMALL, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "a").plan.layer_cuts == [cuts[0]]


def test_unknown_model_is_a_usage_error():
    result = run("convert", "resnet5O", "--layers", 17)
    assert result.exit_code == 2
    assert "unknown model 'resnet5O'" in result.output and "resnet50" in result.output
    assert run("inspect", "timm:test_resnett").exit_code == 2


def test_too_many_layers_is_one_line(tmp_path):
    result = run("convert", "resnet8", "--layers", 50, *SMALL, "-o", tmp_path / "a")
    assert result.exit_code == 1
    lines = _error_line(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "50" in lines[0]
    assert not (tmp_path / "a").exists()


def test_debug_shows_the_traceback():
    for args in (["--debug", "convert", "resnet8", "--layers", 50, *SMALL],
                 ["convert", "resnet8", "--layers", 50, *SMALL, "--debug"]):
        result = run(*args)
        assert result.exit_code == 1
        assert isinstance(result.exception, ValueError) and result.exc_info[2] is not None


@pytest.mark.parametrize("value", ["3,32", "a,b,c", "0,32,32", "3,32,32,1", ""])
def test_bad_input_size(value):
    result = run("convert", "resnet8", "--layers", 2, "--input-size", value)
    assert result.exit_code == 2
    assert "C,H,W" in result.output and "Traceback" not in result.output


def test_parse_input_size():
    assert parse_input_size("3,224,224") == (3, 224, 224)
    assert parse_input_size("1x28x28") == (1, 28, 28)
    assert parse_input_size(None) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "resnet8"], "--layers"),
        (["convert", "resnet8", "--layers", 0], "--layers"),
        (["convert", "resnet8", "--layers", 2, "--aux-init", "random"], "--aux-init"),
        (["convert", "resnet8", "--layers", 2, "--pretrained-file", "/nonexistent.pth"], "--pretrained-file"),
        (["convert", "resnet8", "--layers", 2, "--bogus"], "--bogus"),
        (["export", "somewhere"], "--output"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_pretrained_flags_exclude_each_other(tmp_path):
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(create_model("resnet8", num_classes=10).state_dict(), str(weights))
    result = run("convert", "resnet8", "--layers", 2, "--pretrained", "--pretrained-file", weights)
    assert result.exit_code == 2 and "only one" in result.output


def test_pretrained_file_weights_reach_the_artifact(tmp_path):
    source = create_model("resnet8", num_classes=10)
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(weights))
    result = run("convert", "resnet8", "--layers", 2, *SMALL, "--pretrained-file", weights, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    for k, v in load(tmp_path / "a").source_model.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k


def test_existing_artifact_needs_overwrite(converted, tmp_path):
    out, _ = converted
    target = tmp_path / "a"
    shutil.copytree(out, target)
    result = run("convert", "resnet8", "--layers", 2, *SMALL, "-o", target)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert load(target).plan.num_layers == 3
    result = run("convert", "resnet8", "--layers", 2, *SMALL, "-o", target, "--overwrite")
    assert result.exit_code == 0, result.output
    assert load(target).plan.num_layers == 2


def test_inspect(converted):
    result = run("inspect", "resnet8", *SMALL)
    assert result.exit_code == 0, result.output
    data = json.loads(run("inspect", "resnet8", *SMALL, "--json").output)
    assert len(data["units"]) == 4 and data["valid_cuts"] and data["max_layers"] == len(data["valid_cuts"]) + 1
    for text in ("auglocal:resnet8", "input 3x32x32", "4 units", f"valid cut points ({len(data['valid_cuts'])})",
                 f"largest K: {data['max_layers']}", "K = 4", "head", "FLOPs", data["valid_cuts"][-1],
                 "next: auglocal convert resnet8 --layers 4 --num-classes 10 --input-size 3,32,32 -o DIR"):
        assert text in result.output


def test_export(converted, tmp_path):
    out, _ = converted
    result = run("export", out, "-o", tmp_path / "bb.safetensors")
    assert result.exit_code == 0, result.output
    assert "load_state_dict" in result.output
    fresh = create_model("resnet8", num_classes=10)
    missing, unexpected = fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "bb.safetensors")))
    assert not missing and not unexpected
    result = run("export", out, "-o", tmp_path / "bb.safetensors")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert run("export", out, "-o", tmp_path / "bb.safetensors", "--overwrite").exit_code == 0


def test_export_missing_artifact(tmp_path):
    result = run("export", tmp_path / "nothing", "-o", tmp_path / "bb.safetensors")
    assert result.exit_code == 1
    lines = _error_line(result)
    assert len(lines) == 1 and "no auglocal-fx artifact" in lines[0]


def test_export_corrupt_artifact(converted, tmp_path):
    out, _ = converted
    target = tmp_path / "a"
    shutil.copytree(out, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("export", target, "-o", tmp_path / "bb.safetensors")
    assert result.exit_code == 1
    lines = _error_line(result)
    assert len(lines) == 1 and "sha256" in lines[0] and str(weights) in lines[0]
    (target / "auglocal.json").write_text("{")
    result = run("export", target, "-o", tmp_path / "bb.safetensors")
    assert result.exit_code == 1 and "not valid JSON" in result.output
    assert not (tmp_path / "bb.safetensors").exists()


def test_torchvision_resnet_export_loads_into_a_fresh_torchvision_model(tmp_path):
    import torchvision

    result = run("convert", "resnet18", "--layers", 3, "--input-size", "3,64,64", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert run("export", tmp_path / "a", "-o", tmp_path / "r18.safetensors").exit_code == 0
    fresh = torchvision.models.resnet18()
    missing, unexpected = fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "r18.safetensors")))
    assert not missing and not unexpected


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"cli_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(
        """
        import torch.nn as nn

        def build(num_classes=10):
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
            )

        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

            def forward(self, x):
                return self.b(self.a(x)) if x.mean() > 0 else self.a(x)  # data-dependent: not traceable

        def gated(num_classes=10):
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), Gate(), Gate(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
            )
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_user_model_by_factory_path(user_module, tmp_path):
    result = run("convert", f"{user_module}:build", "--layers", 2, *SMALL, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "a").plan.source == {"name": f"{user_module}:build", "kwargs": {"num_classes": 10}}
    result = run("convert", f"{user_module}:nothing", "--layers", 2)
    assert result.exit_code == 2 and "has no attribute" in result.output


@pytest.mark.parametrize("leaf", ["Gate", "{module}.Gate", "{module}:Gate"])
def test_leaf_modules(user_module, tmp_path, leaf):
    leaf = leaf.format(module=user_module)
    result = run("convert", f"{user_module}:gated", "--layers", 3, *SMALL, "--leaf", leaf, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert cli_main._leaf_modules([leaf]) == ["Gate"]
    plan = load(tmp_path / "a").plan
    assert plan.config["leaf_modules"] == ["Gate"] and not plan.trace["auto_leaves"]


def test_unknown_leaf_is_one_line(user_module):
    result = run("convert", f"{user_module}:gated", "--layers", 3, *SMALL, "--leaf", "NoSuchBlock")
    assert result.exit_code == 1
    lines = _error_line(result)
    assert len(lines) == 1 and "NoSuchBlock" in lines[0]


def test_optional_commands_only_tolerate_their_own_absence():
    package = cli_main.__package__
    assert cli_main._absent(ModuleNotFoundError("x", name=f"{package}.train"), "train")
    # A module that is present but fails to import something it needs must not be hidden.
    assert not cli_main._absent(ModuleNotFoundError("x", name="wandb"), "train")
    assert {"convert", "inspect", "export"} <= set(main.commands)


def test_unexpected_errors_say_how_to_see_more(monkeypatch):
    from auglocal_fx.cli import _errors

    assert _errors.one_line(ValueError("a\n  b")) == "a b"
    assert "KeyError" in _errors.one_line(KeyError("x")) and "--debug" in _errors.one_line(KeyError("x"))
