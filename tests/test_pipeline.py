"""Layer-parallel training: placement, per-layer random streams, and pipelined runs equal to the single-process one.

The multi-process tests spawn one process per stage, gloo over a file:// rendezvous in a temporary folder
(never a fixed port), with 60 s collective timeouts and a deadline on the whole group.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import _pipeline_worker as worker
from auglocal_fx.distributed._pipeline import layer_rng, stream_seed
from auglocal_fx.distributed._placement import (PlacementError, balanced_placement, check_placement, make_placement,
                                                plan_costs, timed_layer_costs)
from auglocal_fx.train import RecipeError, load_recipe

_DEADLINE_S = 420


def _spawn(fn, args, nprocs: int) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes; fail (and kill them) if they outlive the deadline."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + _DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} stage processes did not finish within {_DEADLINE_S} s")


# -- placement ---------------------------------------------------------------------------------------------------
def test_balanced_placement_minimises_the_slowest_stage():
    p = balanced_placement([4.0, 1.0, 1.0, 1.0, 1.0], stages=2)
    assert p.stages == [[0], [1, 2, 3, 4]]
    assert p.stage_costs == [4.0, 4.0] and p.predicted_speedup == pytest.approx(2.0) and p.balance == 1.0
    p = balanced_placement([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], stages=3)
    assert max(p.stage_costs) == 9.0  # [1,2,3,(4)], [4,5]/[5], [6]: nothing better than 9 exists
    assert sum(p.stages, []) == list(range(6))
    brute = min(max(sum([1, 2, 3, 4, 5, 6][a:b]) for a, b in ((0, i), (i, j), (j, 6)))
                for i in range(1, 5) for j in range(i + 1, 6))
    assert max(p.stage_costs) == brute


def test_placement_from_plan_flops_and_its_description():
    lm, _ = worker.build()
    costs = plan_costs(lm.plan)
    assert len(costs) == 4 and all(c > 0 for c in costs)
    expected0 = 3 * (lm.plan.layers[0].flops + lm.plan.aux[0].flops)
    assert costs[0] == expected0
    p = make_placement(costs, stages=2)
    text = p.describe()
    assert "stage 0" in text and "stage 1" in text and f"{p.predicted_speedup:.2f}x" in text
    assert 1.0 < p.predicted_speedup <= 2.0


def test_measured_costs_leave_the_model_and_the_random_streams_alone():
    """`parallel.balance: measured` times each layer on a private copy: the run itself must not change."""
    lm, _ = worker.build()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rng = torch.random.get_rng_state()
    costs = timed_layer_costs(lm, lm.plan.config["input_size"], 4, repeats=1)
    assert len(costs) == len(lm.layers) and all(c > 0 for c in costs)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())  # BatchNorm statistics included
    assert all(p.grad is None for p in lm.parameters())
    assert make_placement(costs, stages=2, source="measured").source == "measured"


@pytest.mark.parametrize("placement, message", [
    ([[0, 1], [3]], "layer 3 where layer 2 was due"),
    ([[0, 1], []], "stage 1 has no layers"),
    ([[0, 1, 2]], "lists 1 stages but parallel.stages is 2"),
    ([[0], [1, 2]], "covers layers 0..2 but the model has 4"),
    ("0,1", "must be a list of lists"),
])
def test_check_placement_refuses_bad_overrides_in_one_line(placement, message):
    with pytest.raises(PlacementError, match=message.replace(".", r"\.")) as info:
        check_placement(placement, num_layers=4, stages=2)
    assert "\n" not in str(info.value)


def test_recipe_parallel_section():
    r = load_recipe("quickstart", overrides=["parallel.stages=2", "parallel.placement=[[0, 1, 2], [3]]"])
    assert r.parallel.stages == 2 and r.parallel.placement == [[0, 1, 2], [3]]
    assert load_recipe("quickstart").parallel.stages == 1  # the default: today's single-process run
    with pytest.raises(RecipeError, match="parallel.placement"):
        load_recipe("quickstart", overrides=["parallel.stages=2", "parallel.placement=[[0], [2, 3]]"])
    with pytest.raises(RecipeError, match="at most convert.layers"):
        load_recipe("quickstart", overrides=["parallel.stages=5"])
    assert load_recipe("quickstart", overrides=["parallel.balance=measured"]).parallel.balance == "measured"
    with pytest.raises(RecipeError, match="parallel.balance"):
        load_recipe("quickstart", overrides=["parallel.balance=time"])


# -- random streams ----------------------------------------------------------------------------------------------
def test_layer_rng_depends_on_seed_step_layer_only_and_restores_the_global_stream():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with layer_rng(1, 5, 2):
        a = torch.rand(8)
    assert torch.equal(torch.get_rng_state(), before)  # data augmentation draws are untouched
    torch.rand(100)  # whatever ran before does not matter
    with layer_rng(1, 5, 2):
        b = torch.rand(8)
    with layer_rng(1, 5, 3):
        c = torch.rand(8)
    with layer_rng(1, 6, 2):
        d = torch.rand(8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert len({stream_seed(0, t, k) for t in range(50) for k in range(50)}) == 2500


# -- pipelined training == single-process training ----------------------------------------------------------------
def _stage_states(tmp_path, placement, steps):
    _spawn(worker.stage_main, (len(placement), str(tmp_path / "init"), str(tmp_path), placement, steps),
           nprocs=len(placement))
    state = {}
    for s in range(len(placement)):
        part = torch.load(tmp_path / f"stage{s}.pt")
        assert part["steps"] == steps
        state.update(part["state"])
    return state


@pytest.mark.parametrize("placement", [[[0, 1], [2, 3]], [[0], [1, 2], [3]]], ids=["S=2", "S=3"])
def test_pipelined_weights_equal_the_single_process_run(tmp_path, placement):
    """BatchNorm (weights and running statistics), dropout in layers, aux nets and head, momentum, per-layer
    clipping: S stages end at the same weights as one process running every layer per batch."""
    steps = 4
    got = _stage_states(tmp_path, placement, steps)
    ref = worker.reference(steps).state_dict()
    init, _ = worker.build()
    assert set(got) == set(ref)
    moved = False
    for key, value in ref.items():
        assert torch.allclose(got[key].double(), value.double(), rtol=0, atol=1e-6), key
        moved |= not torch.equal(value, init.state_dict()[key])
    assert moved  # training changed the weights: the comparison is not between two initial models
    # The per-layer streams matter: a reference with another dropout seed ends elsewhere.
    other = worker.reference(steps, seed_offset=1).state_dict()
    assert any(not torch.allclose(other[k].double(), ref[k].double(), atol=1e-6) for k in ref)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pipeline_run_trains_like_the_single_process_run(tmp_path):
    """`auglocal train` with parallel.stages=2 on two processes: the same losses and accuracies per epoch as the
    single-process run (optimizer.per_layer, the same updates), checkpoint parts, one artifact."""
    from auglocal_fx.train import train

    pp = tmp_path / "pp"
    _spawn(worker.train_main, (2, str(tmp_path / "init"), str(pp), {"parallel": {"stages": 2}}), nprocs=2)
    single = train(worker.tiny_recipe(optimizer={"name": "sgd", "lr": 0.05, "per_layer": True}),
                   output_dir=tmp_path / "single", quiet=True)
    a, b = _metrics(pp / "auglocal"), _metrics(tmp_path / "single" / "auglocal")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["train_layer_loss"] == pytest.approx(y["train_layer_loss"], abs=1e-6)
        assert x["layer_acc"] == y["layer_acc"] and x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-6)
    assert a[-1]["placement"] == [[0, 1], [2, 3]]
    assert (pp / "auglocal" / "model").is_dir()  # one artifact, from every stage's weights
    assert sorted(p.name for p in (pp / "auglocal" / "stages").iterdir()) == ["stage0-e2-b0.pt", "stage1-e2-b0.pt"]
    import auglocal_fx

    exported = auglocal_fx.load(pp / "auglocal" / "model").state_dict()
    expected = auglocal_fx.load(tmp_path / "single" / "auglocal" / "model").state_dict()
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(exported[key].double(), value.double(), atol=1e-6), key


@pytest.mark.slow
def test_pipeline_run_stops_at_one_step_and_resumes_to_the_same_result(tmp_path):
    """A stop on stage 0 mid-epoch: every stage checkpoints at the same step; resuming ends where an
    uninterrupted run ends."""
    stopped = tmp_path / "stopped"
    _spawn(worker.train_main, (2, str(tmp_path / "i1"), str(stopped), {"parallel": {"stages": 2}}, False, 3),
           nprocs=2)
    assert torch.load(stopped / "result.pt")["interrupted"]
    parts = sorted(p.name for p in (stopped / "auglocal" / "stages").iterdir())
    assert parts == ["stage0-e0-b3.pt", "stage1-e0-b3.pt"]
    _spawn(worker.train_main, (2, str(tmp_path / "i2"), str(stopped), {"parallel": {"stages": 2}}, True), nprocs=2)
    whole = tmp_path / "whole"
    _spawn(worker.train_main, (2, str(tmp_path / "i3"), str(whole), {"parallel": {"stages": 2}}), nprocs=2)
    a, b = _metrics(stopped / "auglocal"), _metrics(whole / "auglocal")
    assert [r["layer_acc"] for r in a] == [r["layer_acc"] for r in b]
    assert a[-1]["train_layer_loss"] == pytest.approx(b[-1]["train_layer_loss"], abs=1e-6)
