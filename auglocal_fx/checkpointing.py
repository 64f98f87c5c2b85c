"""End-to-end backprop with activation checkpointing at the converter's cut points: the baseline users pick today.

:class:`CheckpointedBP` trains a :class:`~auglocal_fx.LocalModel`'s layers end to end, like
:meth:`~auglocal_fx.LocalModel.bp_step`, but groups the local layers into segments and keeps only each segment's
input during the forward pass (``torch.utils.checkpoint.checkpoint`` with ``use_reentrant=False``); a segment's
activations are recomputed when backward reaches it. As in ``checkpoint_sequential`` the last segment is not
checkpointed: its backward comes first, so recomputing it would save nothing. The gradients are BP's.

Because the segments are groups of the converter's local layers (one tensor crosses each boundary), it works on
every model the converter handles. With one local layer per unit (``layers=`` the number of units, the paper's
setting) the segments are groups of units.

How many segments, and where: by default about ``sqrt(L)`` segments of the ``L`` layers (the floor and the ceiling
are both tried), with the boundaries that minimise the predicted peak of saved activations. The prediction is the
standard one: while backward runs segment ``j``, the stored inputs of segments ``0..j`` and the recomputed
activations of segment ``j`` are alive, so the peak is ``max_j(sum(inputs[0..j]) + saved[j])``; it is minimised
exactly by dynamic programming over the boundaries. Each layer's input and saved bytes are measured once, at the
first step, on two samples of its batch (:func:`measure_layer_costs`); pass ``segments=`` to fix the count.

BatchNorm's running statistics would be updated twice per step (once in the forward, once in the recompute); the
recompute puts them back as they were, so the statistics are BP's too.

Example::

    lm = auglocal_fx.convert(torchvision.models.resnet50(), layers=17)   # one layer per unit
    ckpt = CheckpointedBP(lm)                                           # 4 or 5 segments: about sqrt(17)
    optimizer.zero_grad()
    loss = ckpt.step(images, labels)                                    # the gradients of lm.bp_step, less memory
    optimizer.step()
    ckpt.ranges          # at batch 64, 224 px: [(0, 2), (2, 4), (4, 7), (7, 12), (12, 17)], 0.46x BP's peak
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .memory import SavedTensorTracker

__all__ = ["CheckpointedBP", "checkpoint_segments", "default_segment_count", "predicted_peak", "measure_layer_costs"]

Cost = Tuple[float, float]  # (input bytes, saved bytes other than the input) of one layer
Range = Tuple[int, int]  # [start, end) over the layers
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ segmenting
def default_segment_count(num_layers: int) -> int:
    """``round(sqrt(L))``, at least 1: the classic choice, which bounds memory by O(sqrt(L)) layers."""
    return max(1, min(num_layers, round(math.sqrt(num_layers))))


def predicted_peak(costs: Sequence[Cost], ranges: Sequence[Range]) -> float:
    """Peak saved bytes of a checkpointed step: ``max_j(sum of the inputs of segments 0..j + saved bytes of j)``."""
    stored, peak = 0.0, 0.0
    for start, end in ranges:
        stored += costs[start][0]
        peak = max(peak, stored + sum(c[1] for c in costs[start:end]))
    return peak


def _best_ranges(costs: Sequence[Cost], count: int) -> Tuple[float, List[Range]]:
    """The ``count`` contiguous segments with the smallest :func:`predicted_peak` (exact, O(L^2 count)).

    ``best[m][i]`` is the best peak of layers ``i..L-1`` cut into ``m`` segments, not counting the inputs stored
    before ``i``: a segment starting at ``i`` adds its input to every later term, so
    ``best[m][i] = in[i] + min_e max(saved[i..e), best[m-1][e])``.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c[1])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(count + 1)]
    cut = [[n] * (n + 1) for _ in range(count + 1)]
    for i in range(n):
        best[1][i] = costs[i][0] + prefix[n] - prefix[i]
    for m in range(2, count + 1):
        for i in range(n - m + 1):
            for e in range(i + 1, n - m + 2):
                value = costs[i][0] + max(prefix[e] - prefix[i], best[m - 1][e])
                if value < best[m][i]:
                    best[m][i], cut[m][i] = value, e
    ranges, i = [], 0
    for m in range(count, 1, -1):
        ranges.append((i, cut[m][i]))
        i = cut[m][i]
    ranges.append((i, n))
    return best[count][0], ranges


def checkpoint_segments(costs: Sequence[Cost], segments: Optional[int] = None) -> List[Range]:
    """Split ``len(costs)`` layers into contiguous segments, as ``[(start, end), ...]``.

    ``segments``: their number (1..L); by default the floor and the ceiling of ``sqrt(L)`` are tried and the one
    with the lower predicted peak wins (the fewer segments on a tie). The boundaries always minimise
    :func:`predicted_peak`.

        >>> checkpoint_segments([(1, 4)] * 9)        # 9 equal layers: 3 segments of 3
        [(0, 3), (3, 6), (6, 9)]
    """
    n = len(costs)
    if n < 1:
        raise ValueError("checkpointing needs at least one layer")
    if segments is not None:
        if not 1 <= int(segments) <= n:
            raise ValueError(f"segments must be between 1 and the number of layers ({n}), got {segments}")
        return _best_ranges(costs, int(segments))[1]
    root = math.sqrt(n)
    counts = sorted({max(1, min(n, c)) for c in (math.floor(root), math.ceil(root))})
    return min((_best_ranges(costs, c) for c in counts), key=lambda r: (r[0], len(r[1])))[1]


def measure_layer_costs(layers: Sequence[nn.Module], x: torch.Tensor) -> List[Cost]:
    """Each layer's (input bytes, saved-for-backward bytes besides its input), on the batch ``x`` (train mode).

    Nothing changes: BatchNorm running statistics are left alone and the RNG state is restored.
    """
    costs: List[Cost] = []
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _frozen_running_stats(layers), torch.enable_grad():
        h = x
        for layer in layers:
            tracker = SavedTensorTracker()
            with tracker:
                out = layer(h)
            own = h.numel() * h.element_size()
            # The input is stored once as the segment's input: not counted again among the saved bytes.
            saved = tracker.peak_bytes - (own if _saves(tracker, h) else 0)
            costs.append((float(own), float(max(0, saved))))
            h = out.detach()
            del out, tracker
    return costs


def _saves(tracker: SavedTensorTracker, tensor: torch.Tensor) -> bool:
    try:
        return tracker.saved(tensor)
    except RuntimeError:  # a tensor without storage
        return False


@contextlib.contextmanager
def _frozen_running_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run BatchNorm-like layers in training mode but leave their running statistics as they were.

    The buffers are copied before and written back after: switching ``track_running_stats`` off instead would make
    batch_norm save other tensors for backward, which the checkpoint's recompute check refuses."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [[(b, b.clone()) for b in m.buffers(recurse=False) if b is not None] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers in saved:
                for live, copy in buffers:
                    live.copy_(copy)


# ------------------------------------------------------------------------------------------------ the step
class CheckpointedBP:
    """End-to-end BP through ``lm.layers`` with activation checkpointing; see the module docstring.

    Args:
        lm: a LocalModel (its ``layers`` are used; its aux nets are not).
        segments: the number of segments (1 = plain BP), or ``None`` for about ``sqrt(K)`` chosen to minimise
            memory. ``ranges`` fixes the segments themselves, as ``[(start, end), ...]`` covering every layer.
    """

    def __init__(self, lm: nn.Module, *, segments: Optional[int] = None, ranges: Optional[Sequence[Range]] = None):
        self.layers = list(lm.layers)
        n = len(self.layers)
        if segments is not None and not 1 <= int(segments) <= n:
            raise ValueError(f"segments must be between 1 and the number of local layers ({n}), got {segments}")
        self.segments = segments
        self.ranges: Optional[List[Range]] = None
        self.costs: Optional[List[Cost]] = None
        if ranges is not None:
            ranges = [(int(a), int(b)) for a, b in ranges]
            if not ranges or ranges[0][0] != 0 or ranges[-1][1] != n or any(
                    a >= b or (i and ranges[i - 1][1] != a) for i, (a, b) in enumerate(ranges)):
                raise ValueError(f"ranges must be contiguous, non-empty and cover layers 0..{n - 1}, got {ranges}")
            self.ranges = ranges

    def plan(self, x: torch.Tensor) -> List[Range]:
        """Choose the segments from footprints measured on two samples of ``x`` (done once, at the first step)."""
        if self.ranges is None:
            # a copy, not a view: the saved-tensor hooks count whole storages
            self.costs = measure_layer_costs(self.layers, x[: min(2, x.shape[0])].clone())
            self.ranges = checkpoint_segments(self.costs, self.segments)
        return self.ranges

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output, keeping only each checkpointed segment's input for backward."""
        ranges = self.plan(x)
        for start, end in ranges[:-1]:
            # Non-reentrant checkpoint: works with inputs that do not require grad (the image) and with
            # torch.autograd.grad; the recompute leaves BatchNorm's running statistics as the forward left them.
            x = checkpoint(self._run, start, end, x, use_reentrant=False,
                           context_fn=lambda s=start, e=end: (contextlib.nullcontext(),
                                                              _frozen_running_stats(self.layers[s:e])))
        start, end = ranges[-1]
        return self._run(start, end, x)

    __call__ = forward

    def _run(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[start:end]:
            x = layer(x)
        return x

    def step(self, x: torch.Tensor, target: torch.Tensor, loss_fn: Optional[LossFn] = None, *,
             scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
        """One checkpointed BP step (forward, loss, backward); returns the detached loss. Gradients accumulate."""
        loss = (loss_fn or F.cross_entropy)(self.forward(x), target)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    def __repr__(self) -> str:
        return f"CheckpointedBP({len(self.layers)} layers, ranges={self.ranges or 'chosen at the first step'})"
