"""Small collectives the trainer needs at the same points on every rank (no-ops in a single process).

Example::

    if agree(ctx, stopper.stop_now):          # every rank stops after the same step, or none does
        ...
    sums = sum_over_ranks(ctx, torch.tensor([correct, n]))
    states = gather_objects(ctx, rng_state())  # on every rank: [rank 0's, rank 1's, ...]
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

from ._context import DistContext

__all__ = ["agree", "sum_over_ranks", "gather_objects", "rank_seed"]


def agree(ctx: DistContext, flag: bool, *, group: Optional[Any] = None) -> bool:
    """True on every rank if ``flag`` is true on any rank (a stop request seen by one rank stops all)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def sum_over_ranks(ctx: DistContext, tensor: torch.Tensor, *, group: Optional[Any] = None) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (a new tensor on ``tensor``'s device)."""
    if not ctx.distributed:
        return tensor.clone()
    # NCCL reduces CUDA tensors only; gloo reduces CPU ones.
    t = tensor.detach().to(ctx.device, copy=True)
    dist.all_reduce(t, group=group)
    return t.to(tensor.device)


def gather_objects(ctx: DistContext, obj: Any, *, group: Optional[Any] = None) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """A seed of its own for ``rank`` (and e.g. epoch, step): rank 0 with no extra keeps ``seed`` itself."""
    if rank == 0 and not extra:
        return seed
    mixed = seed
    for value in (rank, *extra):
        mixed = (mixed * 1_000_003 + value * 7_919 + 12_345) % (2**32)
    return mixed
