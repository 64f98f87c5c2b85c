"""FLOPs of one training step of each benchmarked method, forward and backward (``torch.utils.flop_counter``).

FLOPs are counted on a small batch and scaled: the convolutions, linear layers and matmuls the counter sees are
linear in the batch.

Example::

    flops = count_step_flops(lm, x[:2], y[:2])   # {"bp": ..., "local_backbone": ..., "local_aux": ...}
    count_checkpoint_flops(CheckpointedBP(lm), x[:2], y[:2])   # BP's plus the recomputed forward passes
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpointing import CheckpointedBP

__all__ = ["count_step_flops", "count_checkpoint_flops", "local_loss"]


class _FlopTotal:
    """Sums FLOPs over several ``with`` blocks (FlopCounterMode forgets its counts each time it is entered)."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def __call__(self):
        from .._shapes import total_flop_counter

        counter = total_flop_counter()
        try:
            with counter:
                yield
        finally:
            self.total += int(counter.get_total_flops())


def local_loss(lm: nn.Module, k: int, h: torch.Tensor, target: torch.Tensor, *, inputs: Optional[torch.Tensor] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Hidden layer ``k``'s local loss on its output ``h``, by the LocalModel's rule (cross-entropy of the aux net's
    logits for AugLocal)."""
    rule = getattr(lm, "rule", None)
    if rule is None:
        return F.cross_entropy(lm.aux[k](h), target)
    from ..rules import LossContext

    context = LossContext(layer=k, num_layers=len(lm.layers), options=lm.plan.config.get("rule_options") or {},
                          inputs=inputs if rule.needs_input else None, mean=mean, std=std)
    return rule.loss(lm.aux[k], h, target, context)


def count_step_flops(lm: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> Dict[str, int]:
    """FLOPs of one training step on ``x`` (forward and backward).

    ``bp``: end-to-end BP. ``local_backbone`` / ``local_aux``: the local step split into the local layers' work
    and the aux nets' (each aux loss's backward is run apart, down to the layer output's gradient, so the two are
    told apart exactly). Gradients are left at None.
    """
    lm.zero_grad(set_to_none=True)
    bp = _FlopTotal()
    with bp():
        F.cross_entropy(lm(x), y).backward()
    lm.zero_grad(set_to_none=True)
    backbone, aux = _FlopTotal(), _FlopTotal()
    last = len(lm.layers) - 1
    h = x
    for k, layer in enumerate(lm.layers):
        with backbone():
            out = layer(h)
        if k == last:
            with backbone():
                F.cross_entropy(out, y).backward()
            break
        cut = out.detach().requires_grad_(True)
        with aux():
            local_loss(lm, k, cut, y, inputs=x, mean=mean, std=std).backward()
        with backbone():
            out.backward(cut.grad)
        h = out.detach()
        del out, cut
    lm.zero_grad(set_to_none=True)
    return {"bp": bp.total, "local_backbone": backbone.total, "local_aux": aux.total}


def count_checkpoint_flops(step: CheckpointedBP, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one checkpointed BP step on ``x``: BP's and the forward of every checkpointed segment again."""
    total = _FlopTotal()
    with total():
        step.step(x, y)
    for layer in step.layers:
        layer.zero_grad(set_to_none=True)
    return total.total
