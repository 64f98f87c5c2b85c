"""Which local layers each pipeline stage trains: a contiguous split balanced by training cost.

A stage of the layer-parallel trainer is a contiguous group of local layers. With no gradient crossing a layer
boundary, a pipeline of S stages runs S batches at once and its step time is the slowest stage's, so the split
that minimises the largest stage cost is the fastest one, and the predicted speed-up over one process is::

    speed-up = (sum of all layer costs) / (cost of the slowest stage)

A layer's cost is one training step of the layer and its aux net (or the head): forward plus backward, taken
as 3x the forward FLOPs from the plan (the backward of a conv or a matmul costs twice its forward), or measured
seconds when given.

Example::

    >>> p = balanced_placement([4.0, 1.0, 1.0, 1.0, 1.0], stages=2)
    >>> p.stages, round(p.predicted_speedup, 2)
    ([[0], [1, 2, 3, 4]], 2.0)
    >>> check_placement([[0, 1], [2, 3, 4]], num_layers=5, stages=2)
    [[0, 1], [2, 3, 4]]
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from .._partition import linear_partition

__all__ = ["Placement", "PlacementError", "plan_costs", "measured_costs", "timed_layer_costs", "balanced_placement",
           "check_placement", "make_placement"]

# Forward + backward of a layer whose backward computes both input and weight gradients.
_TRAIN_FLOPS_FACTOR = 3


class PlacementError(ValueError):
    """A stage split that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Placement:
    """Layers per stage, with each layer's training cost (FLOPs or seconds; only ratios matter)."""

    stages: List[List[int]]
    costs: List[float]
    source: str  # "plan FLOPs", "measured" or "given"

    @property
    def stage_costs(self) -> List[float]:
        return [sum(self.costs[k] for k in layers) for layers in self.stages]

    @property
    def predicted_speedup(self) -> float:
        """One process's step time over the slowest stage's: the pipeline's steady-state speed-up."""
        slowest = max(self.stage_costs)
        return sum(self.costs) / slowest if slowest > 0 else float(len(self.stages))

    @property
    def balance(self) -> float:
        """Mean stage cost over the largest (1.0 = perfectly balanced)."""
        costs = self.stage_costs
        return (sum(costs) / len(costs)) / max(costs) if max(costs) > 0 else 1.0

    def stage_of(self, layer: int) -> int:
        return next(s for s, layers in enumerate(self.stages) if layer in layers)

    def describe(self) -> str:
        """One line per stage and the prediction, as the start of a run prints them."""
        total = sum(self.costs) or 1.0
        lines = [f"layer-parallel placement over {len(self.stages)} stages ({self.source}):"]
        for s, (layers, cost) in enumerate(zip(self.stages, self.stage_costs)):
            span = f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
            lines.append(f"  stage {s}: layers {span:<7} {100 * cost / total:5.1f}% of the step")
        lines.append(f"  balance {self.balance:.2f}; predicted speed-up {self.predicted_speedup:.2f}x "
                     f"(one process's step over the slowest stage's)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"stages": [list(s) for s in self.stages], "costs": list(self.costs), "source": self.source,
                "stage_costs": self.stage_costs, "predicted_speedup": self.predicted_speedup,
                "balance": self.balance}


def plan_costs(plan: Any) -> List[float]:
    """Per local layer, the training FLOPs per sample from the plan: 3 x (layer + aux net forward)."""
    costs = []
    for layer in plan.layers:
        aux = plan.aux[layer.index] if layer.index < len(plan.aux) else None
        costs.append(float(_TRAIN_FLOPS_FACTOR * (layer.flops + (aux.flops if aux is not None else 0))))
    return costs


def measured_costs(train_layer: Callable[[int, Any], Any], first_input: Any, num_layers: int, *,
                   repeats: int = 3) -> List[float]:
    """Per local layer, the median seconds of ``train_layer(k, x) -> next x`` (after one warm-up pass).

    ``train_layer`` trains layer ``k`` on ``x`` and returns its output, e.g.
    ``lambda k, x: lm.train_layer(k, x, labels)[0]``; gradients it leaves are the caller's to drop.
    """
    if repeats < 1:
        raise PlacementError(f"repeats must be >= 1, got {repeats}")
    samples: List[List[float]] = [[] for _ in range(num_layers)]
    for rep in range(repeats + 1):
        x = first_input
        for k in range(num_layers):
            t0 = time.perf_counter()
            x = train_layer(k, x)
            if rep:  # the first pass warms allocators and kernels up
                samples[k].append(time.perf_counter() - t0)
    return [sorted(s)[len(s) // 2] for s in samples]


def timed_layer_costs(lm: Any, input_shape: Sequence[int], batch: int, *, device: Any = None,
                      repeats: int = 2) -> List[float]:
    """Per local layer, the measured seconds of one training step (layer and aux net, forward and backward) on a
    random batch of ``batch`` inputs of per-sample ``input_shape``, on ``device`` (default: the model's).

    It trains a private copy of ``lm`` with the global random state saved and restored, so neither the model
    (its BatchNorm statistics) nor the run's random streams change: a run balanced by measured times still
    computes exactly what the single-process run does.
    """
    import copy

    import torch

    probe = copy.deepcopy(lm).train()
    if device is not None:
        probe.to(device)
    device = next(probe.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *input_shape, generator=generator).to(device)
        y = torch.randint(0, int(probe.plan.head.out_shape[-1]), (batch,), generator=generator).to(device)
        mean, std = [0.5] * int(input_shape[0]), [0.25] * int(input_shape[0])

        def step(k: int, h: Any) -> Any:
            out = probe.train_layer(k, h, y, inputs=x if probe.rule.needs_input else None, mean=mean, std=std)[0]
            probe.zero_grad(set_to_none=True)
            sync()  # the step's kernels are done when its time is read
            return out

        return measured_costs(step, x, len(probe.layers), repeats=repeats)


def balanced_placement(costs: Sequence[float], *, stages: int, source: str = "plan FLOPs") -> Placement:
    """The contiguous split of ``costs`` into ``stages`` non-empty groups with the smallest largest group.

    Exact (dynamic programming over split points, O(stages x K^2)); ties go to the split that puts more
    layers in earlier stages, so that the last stage, which also runs the head, is the lighter one.
    """
    k = len(costs)
    if stages < 1:
        raise PlacementError(f"parallel.stages must be >= 1, got {stages}")
    if stages > k:
        raise PlacementError(f"parallel.stages is {stages} but the model has only {k} local layers; use at most "
                             f"{k} stages or more local layers (convert.layers)")
    # Ties go to later cuts: the last stage, which also runs the head, is the lighter one.
    bounds = [0] + linear_partition([float(c) for c in costs], stages, later_cuts=True) + [k]
    groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    return Placement(stages=groups, costs=[float(c) for c in costs], source=source)


def check_placement(placement: Any, *, num_layers: Optional[int] = None, stages: Optional[int] = None) -> List[List[int]]:
    """Validate a user's ``parallel.placement`` and return it as lists of ints (raises :class:`PlacementError`).

    It must list ``stages`` non-empty groups of consecutive layer indices that together cover ``0..K-1`` in
    order, e.g. ``[[0, 1, 2], [3, 4]]``. ``num_layers`` or ``stages`` may be None when not yet known.
    """
    if not isinstance(placement, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in placement):
        raise PlacementError(f"parallel.placement must be a list of lists of layer indices, e.g. [[0, 1], [2, 3]]; "
                             f"got {placement!r}")
    groups = [list(g) for g in placement]
    if stages is not None and len(groups) != stages:
        raise PlacementError(f"parallel.placement lists {len(groups)} stages but parallel.stages is {stages}; "
                             "give one list of layers per stage")
    expected = 0
    for s, group in enumerate(groups):
        if not group:
            raise PlacementError(f"parallel.placement stage {s} has no layers; every stage needs at least one")
        for layer in group:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise PlacementError(f"parallel.placement stage {s} lists {layer!r}; layers are integer indices")
            if layer != expected:
                raise PlacementError(
                    f"parallel.placement stage {s} lists layer {layer} where layer {expected} was due: stages must "
                    "be contiguous groups covering 0..K-1 in order, e.g. [[0, 1, 2], [3, 4]]")
            expected += 1
    if num_layers is not None and expected != num_layers:
        raise PlacementError(f"parallel.placement covers layers 0..{expected - 1} but the model has {num_layers} "
                             f"local layers; list every layer 0..{num_layers - 1} exactly once")
    return groups


def make_placement(costs: Sequence[float], *, stages: int, placement: Optional[Any] = None,
                   source: str = "plan FLOPs") -> Placement:
    """The user's placement when given (validated), else the balanced one."""
    if placement is None:
        return balanced_placement(costs, stages=stages, source=source)
    groups = check_placement(placement, num_layers=len(costs), stages=stages)
    return Placement(stages=groups, costs=[float(c) for c in costs], source=f"given; costs from {source}")
