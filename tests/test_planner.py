"""auglocal_fx.planner and `auglocal plan`: predictions against the benchmark's measurements on tiny models."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner

import auglocal_fx
from _models import tiny_net
from auglocal_fx.bench import BenchConfig, run_benchmark
from auglocal_fx.planner import format_plan_report, plan_memory


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_net()


@pytest.fixture(scope="module")
def plan_report(model):
    return plan_memory(model, batch=8, layers=[3, 4], aux_depths=[1, 2], pyramid=0.0, input_size=SIZE)


@pytest.fixture(scope="module")
def bench_report(model):
    lm = auglocal_fx.convert(copy.deepcopy(model), layers=4, aux_depth=2, pyramid=0.0, input_size=SIZE)
    return run_benchmark(lm, BenchConfig(batch=8, steps=1, warmup=1, methods=("bp", "checkpoint", "auglocal")))


def _candidate(report, k, d):
    (row,) = [r for r in report["candidates"] if r["layers"] == k and r["aux_depth"] == d]
    return row


def test_state_matches_bench_exactly(plan_report, bench_report):
    pred = _candidate(plan_report, 4, 2)["detail"]["state"]
    meas = bench_report["auglocal"]["memory"]["state"]
    assert pred["backbone"]["weights"] == meas["backbone_weights"]
    assert pred["backbone"]["optimizer"] == meas["backbone_optimizer"]
    assert pred["aux"]["weights"] == meas["aux_weights"]
    assert pred["aux"]["optimizer"] == meas["aux_optimizer"]
    assert plan_report["bp"]["state"]["weights"] == bench_report["bp"]["memory"]["state"]["backbone_weights"]


def test_activations_match_tracker(plan_report, bench_report):
    """The chained per-piece footprints equal what SavedTensorTracker sees in the real steps (to 1%)."""
    pred = _candidate(plan_report, 4, 2)["detail"]
    assert pred["activations_peak"] == pytest.approx(bench_report["auglocal"]["memory"]["activations_peak"], rel=0.01)
    assert plan_report["bp"]["step"]["activations_peak"] == pytest.approx(
        bench_report["bp"]["memory"]["activations_peak"], rel=0.01)


def test_peak_brackets_the_accounted_one(plan_report, bench_report):
    """Predicted = state + batch + replayed step (activations, gradients, backward temporaries). The bench's accounted
    peak is the same without temporaries: the prediction must lie just above it. (The issue's 15% criterion against
    the measured peak is checked on real models by benchmarks/planner_accuracy.py: at this toy size the process RSS
    is dominated by allocator and library overheads.)"""
    for pred, method in ((_candidate(plan_report, 4, 2)["detail"], "auglocal"), (plan_report["bp"], "bp")):
        accounted = bench_report[method]["memory"]["accounted_peak"]
        assert accounted <= pred["predicted_peak"] <= 1.3 * accounted


def test_batch_scaling(model):
    """Activations scale with the batch; parameter state does not."""
    small = plan_memory(model, batch=8, layers=[4], aux_depths=[2], pyramid=0.0, input_size=SIZE)
    big = plan_memory(model, batch=64, layers=[4], aux_depths=[2], pyramid=0.0, input_size=SIZE)
    s, b = small["candidates"][0]["detail"], big["candidates"][0]["detail"]
    assert s["state"] == b["state"]
    assert b["activations_peak"] == pytest.approx(8 * s["activations_peak"], rel=0.02)
    assert big["bp"]["predicted_peak"] > small["bp"]["predicted_peak"]


def test_recommendation_rule(model, plan_report):
    peaks = {(r["layers"], r["aux_depth"]): r["predicted_peak"] for r in plan_report["candidates"]}
    # A budget everything fits: the fewest, shallowest aux nets.
    rep = plan_memory(model, batch=8, budget=10**12, layers=[3, 4], aux_depths=[1, 2], pyramid=0.0, input_size=SIZE)
    assert (rep["recommended"]["layers"], rep["recommended"]["aux_depth"]) == (3, 1)
    assert rep["bp_fits"]
    # Nothing fits.
    rep = plan_memory(model, batch=8, budget=1000, layers=[3, 4], aux_depths=[1, 2], pyramid=0.0, input_size=SIZE)
    assert rep["recommended"] is None and not rep["bp_fits"]
    assert "nothing fits" in format_plan_report(rep)
    # Just enough for one candidate: that one, and everything recommended fits.
    target = min(peaks, key=peaks.get)
    rep = plan_memory(model, batch=8, budget=int(peaks[target]) + 1, layers=[3, 4], aux_depths=[1, 2], pyramid=0.0,
                      input_size=SIZE)
    rec = rep["recommended"]
    assert rec["predicted_peak"] <= rep["budget"]
    fitting = [k for k, v in peaks.items() if v <= rep["budget"]]
    assert (rec["layers"], rec["aux_depth"]) == min(fitting)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="K=99"):
        plan_memory(model, batch=8, layers=[99], input_size=SIZE)
    with pytest.raises(ValueError, match="optimizer"):
        plan_memory(model, batch=8, optimizer="lion", input_size=SIZE)


def test_cli_plan(tmp_path):
    from auglocal_fx.cli.main import main

    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["plan", "auglocal:resnet8", "--batch", "32", "--memory-budget", "64MiB",
                                       "--input-size", "3,32,32", "--aux-depths", "1,2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "BP (end-to-end): predicted peak" in result.output
    doc = json.loads(out.read_text())
    assert doc["budget"] == 64 * 2**20 and len(doc["candidates"]) == 2 * (doc["units"] - 1)
    json.dumps(doc)


def test_checkpoint_prediction(plan_report, bench_report):
    """With one layer per unit, plan and bench cut the same segments; the state is BP's; the predicted peak lies
    above the bench's accounted one (which cannot see recomputed activations) and below BP's prediction."""
    pred = plan_report["checkpoint"]
    meas = bench_report["checkpoint"]
    assert pred["segments"] == meas["checkpoint"]["ranges"]
    assert pred["state"] == plan_report["bp"]["state"]
    assert pred["state"]["weights"] == meas["memory"]["state"]["backbone_weights"]
    assert meas["memory"]["accounted_peak"] <= pred["predicted_peak"] <= plan_report["bp"]["predicted_peak"]
    assert pred["ratio_to_bp"] == pytest.approx(pred["predicted_peak"] / plan_report["bp"]["predicted_peak"])
    assert "activation checkpointing" in format_plan_report(plan_report)
