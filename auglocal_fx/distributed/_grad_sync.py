"""Data-parallel gradient averaging for local learning: each layer's all-reduce overlaps the next layer's compute.

Local learning calls backward once per layer. One DistributedDataParallel around the whole model, driven by K
forwards and ``no_sync``, either leaves gradients silently unsynchronised or all-reduces the whole model in
every backward, depending on the torch version. ``LayerGradSync`` instead does what DDP does, per local layer:
as soon as layer ``k``'s backward ends (its parameters and its aux net's have every gradient they will get),
their gradients are flattened into a bucket and averaged over the data-parallel group with an asynchronous
all-reduce, while layer ``k+1`` computes. Layers smaller than ``bucket_cap_mb`` share a bucket with the next
ones (fewer, larger messages). Floating buffers (BatchNorm running statistics) are broadcast from the group's
first rank in the same bucket, as DDP's ``broadcast_buffers`` does, so every replica evaluates the same model.

Example (what the trainer does with a per-layer optimizer)::

    sync = LayerGradSync(lm, group=ctx.group("dp"))
    sync.broadcast_parameters()                      # every replica starts from rank 0's weights
    opt = PerLayerOptimizer(lm, make, reducer=sync)  # layer k steps once its all-reduce is done
    lm.local_step(x, y, after_backward=opt.after_backward)
    opt.finish()                                     # waits for the last buckets and steps their layers

With one optimizer for the whole model: ``after_backward=sync.launch``, then ``sync.wait_all()`` and step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["LayerGradSync", "SyncStats"]


@dataclass
class SyncStats:
    """Where the all-reduce time went, summed since the last :meth:`LayerGradSync.reset_stats`."""

    buckets: int = 0
    bytes: int = 0
    wait_s: float = 0.0  # time the training loop was blocked waiting for all-reduces (not overlapped)
    launch_s: float = 0.0  # time spent flattening and launching (on the training thread)

    def to_dict(self) -> Dict[str, float]:
        return {"buckets": self.buckets, "bytes": self.bytes, "wait_s": self.wait_s, "launch_s": self.launch_s}


@dataclass
class _Bucket:
    layers: List[int]
    grads: List[torch.Tensor]  # the .grad tensors (or fresh zeros where a parameter got none), in order
    missing: List[bool]  # parameters that had no gradient: set back to None once averaged
    params: List[nn.Parameter]
    flat: torch.Tensor
    buffers: List[torch.Tensor]
    flat_buffers: Optional[torch.Tensor]
    works: List[Any] = field(default_factory=list)


class LayerGradSync:
    """Average each local layer's gradients over ``group`` right after its backward, asynchronously.

    Args:
        lm: a :class:`~auglocal_fx.LocalModel` (``layers``, ``aux``, ``local_parameters(k)``).
        group: the data-parallel process group (None: the default group, i.e. every rank).
        bucket_cap_mb: layers are gathered into one all-reduce until it holds this much gradient.
        broadcast_buffers: keep floating buffers (BatchNorm statistics) equal to the group's first rank's.
    """

    def __init__(self, lm: nn.Module, *, group: Optional[Any] = None, bucket_cap_mb: float = 4.0,
                 broadcast_buffers: bool = True) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.cap_bytes = int(bucket_cap_mb * 2**20)
        num = len(lm.layers)
        self.layer_params: List[List[nn.Parameter]] = [
            [p for p in lm.local_parameters(k) if p.requires_grad] for k in range(num)]
        self.layer_buffers: List[List[torch.Tensor]] = []
        for k in range(num):
            modules = [lm.layers[k]] + ([lm.aux[k]] if k < len(lm.aux) else [])
            bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()] if broadcast_buffers else []
            self.layer_buffers.append(bufs)
        self._lm = lm
        self._open: List[int] = []  # layers waiting to fill the next bucket
        self._open_bytes = 0
        self._inflight: List[_Bucket] = []
        self._bucket_of: Dict[int, _Bucket] = {}
        self.stats = SyncStats()

    # -- start of training ------------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Make every replica's parameters and buffers equal to the group's first rank's (blocking)."""
        tensors = [p.detach() for p in self._lm.parameters()] + [b for b in self._lm.buffers()]
        if tensors:
            dist._broadcast_coalesced(self.group or dist.group.WORLD, tensors, 256 * 2**20, self.src)

    # -- per layer ----------------------------------------------------------------------------------------
    def launch(self, k: int) -> None:
        """Layer ``k``'s backward has ended: queue its gradients; all-reduce the bucket once it is full."""
        self._open.append(k)
        self._open_bytes += sum(p.numel() * p.element_size() for p in self.layer_params[k])
        if self._open_bytes >= self.cap_bytes or k == len(self.layer_params) - 1:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """All-reduce the layers queued so far, even if their bucket is not full."""
        if not self._open:
            return
        t0 = time.perf_counter()
        layers, self._open, self._open_bytes = self._open, [], 0
        params = [p for k in layers for p in self.layer_params[k]]
        missing = [p.grad is None for p in params]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        buffers = [b for k in layers for b in self.layer_buffers[k]]
        flat = _flatten_dense_tensors(grads) if grads else torch.zeros(0)
        # Divide first: gloo has no AVG, and the sum of pre-divided gradients cannot overflow in fp16.
        flat.div_(self.world_size)
        bucket = _Bucket(layers=layers, grads=grads, missing=missing, params=params, flat=flat,
                         buffers=buffers, flat_buffers=None)
        if grads:
            bucket.works.append(dist.all_reduce(flat, group=self.group, async_op=True))
        if buffers:
            bucket.flat_buffers = _flatten_dense_tensors(buffers)
            bucket.works.append(dist.broadcast(bucket.flat_buffers, src=self.src, group=self.group,
                                               async_op=True))
        self._inflight.append(bucket)
        for k in layers:
            self._bucket_of[k] = bucket
        self.stats.buckets += 1
        self.stats.bytes += flat.numel() * flat.element_size()
        self.stats.launch_s += time.perf_counter() - t0

    def ready(self, k: int) -> bool:
        """Whether layer ``k``'s averaged gradients are in place (finishing its bucket if it has arrived)."""
        bucket = self._bucket_of.get(k)
        if bucket is None:
            return False
        if bucket in self._inflight and all(w.is_completed() for w in bucket.works):
            self._finish(bucket)
        return bucket not in self._inflight

    def wait(self, k: int) -> None:
        """Block until layer ``k``'s gradients are averaged (launching its bucket if still open)."""
        if k not in self._bucket_of:
            self.flush()
        bucket = self._bucket_of[k]
        if bucket in self._inflight:
            self._finish(bucket)

    def wait_all(self) -> None:
        """Launch what is queued and block until every bucket is averaged (the end of a batch)."""
        self.flush()
        for bucket in list(self._inflight):
            self._finish(bucket)
        self._bucket_of.clear()

    def done(self, k: int) -> None:
        """Forget layer ``k`` for this batch (its optimizer has stepped)."""
        self._bucket_of.pop(k, None)

    @torch.no_grad()
    def _finish(self, bucket: _Bucket) -> None:
        t0 = time.perf_counter()
        for work in bucket.works:
            work.wait()  # the process group's timeout bounds this wait
        self.stats.wait_s += time.perf_counter() - t0
        if bucket.grads:
            for p, g, avg, was_missing in zip(bucket.params, bucket.grads, _unflatten_dense_tensors(
                    bucket.flat, bucket.grads), bucket.missing):
                if was_missing:
                    p.grad = avg.clone() if bool(avg.any()) else None
                else:
                    g.copy_(avg)
        if bucket.flat_buffers is not None:
            for b, value in zip(bucket.buffers, _unflatten_dense_tensors(bucket.flat_buffers, bucket.buffers)):
                b.copy_(value)
        self._inflight.remove(bucket)

    # -- whole model at once (end-to-end backprop) -------------------------------------------------------
    def all_layers(self) -> None:
        """Average every layer's gradients after one backward through the whole model (the bp baseline)."""
        for k in range(len(self.layer_params)):
            self.launch(k)
        self.wait_all()

    def reset_stats(self) -> SyncStats:
        stats, self.stats = self.stats, SyncStats()
        return stats
