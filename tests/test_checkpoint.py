"""auglocal_fx.checkpointing: checkpointed end-to-end BP at the converter's cut points gives BP's gradients."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import auglocal_fx
from _models import tiny_net
from auglocal_fx.memory import SavedTensorTracker
from auglocal_fx.checkpointing import (
    CheckpointedBP,
    checkpoint_segments,
    default_segment_count,
    measure_layer_costs,
    predicted_peak,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return auglocal_fx.convert(tiny_net(), layers=4, aux_depth=1, input_size=(3, 16, 16))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("segments", [1, 2, 3, 4, None])
def test_same_gradients_and_running_stats_as_bp(lm, segments):
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    bp, ck = copy.deepcopy(lm), copy.deepcopy(lm)
    loss_bp = bp.bp_step(x, y)
    step = CheckpointedBP(ck, segments=segments)
    loss_ck = step.step(x, y)
    assert torch.equal(loss_bp, loss_ck)
    g_bp, g_ck = _grads(bp), _grads(ck)
    assert g_bp.keys() == g_ck.keys() and len(g_bp) == len(bp.backbone_parameters())
    for name in g_bp:
        torch.testing.assert_close(g_ck[name], g_bp[name], rtol=0, atol=0, msg=name)
    # the recompute must not update BatchNorm's running statistics a second time
    for (name, a), b in zip(bp.named_buffers(), ck.buffers()):
        assert torch.equal(a, b), name
    assert step.ranges[0][0] == 0 and step.ranges[-1][1] == 4
    assert len(step.ranges) == (segments or default_segment_count(4))


def test_checkpoint_saves_less_than_bp():
    """On a deeper chain, the saved-for-backward peak drops to the prediction's order of magnitude."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()) for _ in range(9)]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    lm = auglocal_fx.convert(model, layers=9, aux_depth=1, input_size=(8, 8, 8))
    x, y = torch.randn(4, 8, 8, 8), torch.randint(0, 3, (4,))
    ck = CheckpointedBP(lm)
    ck.plan(x)
    peaks = {}
    for name, fn in (("bp", lambda: lm.bp_step(x, y)), ("ckpt", lambda: ck.step(x, y))):
        lm.zero_grad(set_to_none=True)
        with SavedTensorTracker() as tracker:
            fn()
        peaks[name] = tracker.peak_bytes
    assert len(ck.ranges) == 3
    assert peaks["ckpt"] < 0.6 * peaks["bp"]


def test_segments_minimise_the_predicted_peak():
    costs = [(4.0, 10.0), (4.0, 10.0), (4.0, 100.0), (4.0, 10.0), (4.0, 10.0), (4.0, 10.0), (4.0, 10.0), (4.0, 10.0),
             (4.0, 10.0)]
    ranges = checkpoint_segments(costs, 3)
    # exhaustive check of every 3-segment split
    best = min(predicted_peak(costs, [(0, a), (a, b), (b, 9)]) for a in range(1, 8) for b in range(a + 1, 9))
    assert predicted_peak(costs, ranges) == best
    assert any(a <= 2 < b and b - a == 1 for a, b in ranges)  # the heavy layer gets a segment to itself
    assert checkpoint_segments([(1.0, 4.0)] * 9) == [(0, 3), (3, 6), (6, 9)]
    assert len(checkpoint_segments([(1.0, 4.0)] * 17)) in (math.floor(math.sqrt(17)), math.ceil(math.sqrt(17)))
    assert checkpoint_segments([(1.0, 1.0)] * 5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="between 1"):
        checkpoint_segments([(1.0, 1.0)] * 5, 6)


def test_measuring_costs_changes_nothing(lm):
    model = copy.deepcopy(lm)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(2, 3, 16, 16)
    state = torch.get_rng_state()
    costs = measure_layer_costs(list(model.layers), x)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert len(costs) == 4 and costs[0][0] == 2 * 3 * 16 * 16 * 4 and all(c[1] > 0 for c in costs)


def test_bad_ranges_are_refused(lm):
    with pytest.raises(ValueError, match="cover"):
        CheckpointedBP(lm, ranges=[(0, 2), (3, 4)])
    with pytest.raises(ValueError, match="between 1"):
        CheckpointedBP(lm, segments=9)
    step = CheckpointedBP(lm, ranges=[(0, 1), (1, 4)])
    assert step.plan(torch.randn(2, 3, 16, 16)) == [(0, 1), (1, 4)]
