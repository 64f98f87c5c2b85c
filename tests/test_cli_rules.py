"""`--rule` and `--rule-option` on `auglocal convert`, and a rule comparison through `auglocal train`."""
import json

import pytest
from click.testing import CliRunner

from auglocal_fx.cli.main import main
from auglocal_fx.io import load

SMALL = ["--input-size", "3,32,32", "--num-classes", "10"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("rule", ["dgl", "predsim", "infopro", "greedy"])
def test_convert_with_each_rule_saves_and_loads(rule, tmp_path):
    result = run("convert", "resnet8", "--layers", 3, *SMALL, "--rule", rule, "-o", tmp_path / rule)
    assert result.exit_code == 0, result.output
    assert f"rule {rule}" in result.output and "aux net" in result.output
    plan = json.loads((tmp_path / rule / "auglocal.json").read_text())["plan"]
    assert plan["config"]["rule"] == rule and all(a["net"] and a["params"] > 0 for a in plan["aux"])
    assert load(tmp_path / rule).plan.config["rule"] == rule


def test_rule_option_reaches_the_plan(tmp_path):
    result = run("convert", "resnet8", "--layers", 3, *SMALL, "--rule", "infopro", "--rule-option", "x1=2.5",
                 "--rule-option", "y2=1", "-o", tmp_path / "ip")
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "ip" / "auglocal.json").read_text())["plan"]["config"]["rule_options"]
    assert options["x1"] == 2.5 and options["y2"] == 1.0


@pytest.mark.parametrize("args, words", [
    (["--rule", "hebbian"], ["unknown rule 'hebbian'", "auglocal, dgl, greedy, infopro, predsim"]),
    (["--rule", "infopro", "--rule-option", "x9=1"], ["no option 'x9'", "decoder, x1, x2, y1, y2"]),
    (["--rule-option", "x1"], ["NAME=VALUE"]),
])
def test_wrong_rule_or_option_is_one_line(args, words):
    result = run("convert", "resnet8", "--layers", 3, *SMALL, "--dry-run", *args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1, result.output
    for word in words:
        assert word in error[0], error[0]


def test_bench_compares_bp_with_the_chosen_rule(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "auglocal:resnet8", "--layers", 3, "--batch", 4, "--input-size", "3,32,32",
                 "--num-classes", 10, "--rule", "infopro", "--rule-option", "x1=2", "--steps", 1, "--warmup", 0,
                 "--no-memory-probe", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["methods"] == ["bp", "infopro"] and report["config"]["rule_options"] == {"infopro": {"x1": 2}}


def test_bench_refuses_a_wrong_rule_in_one_line():
    result = run("bench", "auglocal:resnet8", "--layers", 3, "--batch", 4, "--rule", "grdy")
    assert result.exit_code == 2 and "unknown rule 'grdy'" in result.output and "Traceback" not in result.output
