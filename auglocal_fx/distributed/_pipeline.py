"""One pipeline stage of layer-parallel training: its local layers, its optimizers, forward-only messages.

Local learning has no update locking: layer ``k`` learns from its own loss, so at step ``t`` its input depends
only on the layers below it after their ``t-1`` updates. A stage (a contiguous group of local layers, see
``_placement``) can therefore train batch ``t`` while the stage above it trains batch ``t-1``:

* stage ``s`` receives from stage ``s-1`` the detached boundary activation of batch ``t``, its labels and, when
  the rule needs it (InfoPro), the input image;
* it trains each of its layers on its own loss and steps that layer's optimizer right after its backward;
* it sends its output on to stage ``s+1``. No gradient travels back; there is no barrier per step.

Messages are fixed-size (shapes from the plan, batch padded to the largest), so every receive can be posted
one step ahead into the other of two buffers (double buffering) while the current batch trains. Each message
is ``[header | labels]`` (int64), the activation (float32 on the wire, cast back to its dtype on arrival, so
bf16/fp16 values cross unchanged) and, for rules that need it, the image.

Exactness: with :func:`layer_rng` (dropout and drop-path draw from a stream seeded by ``(seed, step, layer)``)
and per-layer optimizers, the pipeline computes the same updates as the single-process loop
:func:`train_layers` over all layers. Example (one process per stage, ranks ``0..S-1`` of the default group)::

    stage = Stage(lm, layers=[3, 4], rank=1, prev_rank=0, next_rank=None, optimizer=opt,
                  capacity=128, device=torch.device("cpu"), seed=0)
    result = stage.train_stream(first_step=0)          # until stage 0 sends the end of the epoch
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["layer_rng", "stream_seed", "train_layers", "Stage", "StreamResult", "BATCH", "END", "STOP"]

# Message kinds (the header's first field).
BATCH, END, STOP = 0, 1, 2
_HEADER = 4  # kind, step, batch size, dtype code
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, step: int, layer: int) -> int:
    """A 63-bit seed for layer ``layer`` at global step ``step`` (SplitMix64 finaliser over the three)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(layer) * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@contextlib.contextmanager
def layer_rng(seed: int, step: int, layer: int, *, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the body on layer ``layer``'s own random stream at ``step``; the global RNG state is restored after.

    Dropout and drop-path masks then depend only on ``(seed, step, layer)``, not on which process trains the
    layer or what ran before it, which is what makes a pipelined run equal the single-process one. The data
    pipeline's draws (augmentation in the main process) are untouched, since the state is restored::

        with layer_rng(0, step=12, layer=3):
            out, loss = lm.train_layer(3, x, y)
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    accel = device.type in ("cuda", "xpu")
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    value = stream_seed(seed, step, layer)
    with torch.random.fork_rng(devices=[index] if accel else [], device_type=device.type if accel else "cuda"):
        torch.default_generator.manual_seed(value)
        if accel:
            with torch.get_device_module(device.type).device(index):
                torch.get_device_module(device.type).manual_seed(value)
        yield


def train_layers(
    lm: nn.Module,
    layers: Sequence[int],
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    step: int,
    seed: int,
    optimizer: Any,
    loss_fn: Optional[Callable] = None,
    scaler: Optional[Any] = None,
    inputs: Optional[torch.Tensor] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Train ``layers`` (in order) on batch ``x`` at global ``step``; each steps its optimizer after its backward.

    The unit both a pipeline stage and the single-process reference run: over ``range(K)`` it is one
    local-learning step with per-layer random streams. ``optimizer`` has ``after_backward(k)``
    (:class:`~auglocal_fx.PerLayerOptimizer`). Returns the last layer's detached output and the detached losses.
    """
    losses = []
    for k in layers:
        with layer_rng(seed, step, k, device=x.device), autocast():
            x, loss = lm.train_layer(k, x, target, loss_fn, scaler=scaler, inputs=inputs, mean=mean, std=std)
        optimizer.after_backward(k)
        losses.append(loss)
    return x, losses


@dataclass
class StreamResult:
    """What one stage did in one stream (an epoch, or the part of it before a stop)."""

    steps: int = 0  # batches trained (or evaluated)
    samples: int = 0
    loss_sums: Optional[torch.Tensor] = None  # per layer of the stage, sum of loss x batch size (float64)
    correct: Optional[torch.Tensor] = None  # evaluation: per layer of the stage, correct predictions
    head_loss_sum: float = 0.0  # evaluation, last stage: summed cross-entropy of the head
    end: int = END  # END (the stream ran out) or STOP (stopped early, e.g. Ctrl-C)
    skipped: int = 0  # fp16 steps skipped for overflow
    extra: dict = field(default_factory=dict)


class _Wire:
    """Fixed-size message buffers for one direction between two stages."""

    def __init__(self, *, capacity: int, act_shape: Sequence[int], img_shape: Optional[Sequence[int]],
                 device: torch.device) -> None:
        self.capacity = capacity
        self.act_shape = tuple(act_shape)
        self.img_shape = tuple(img_shape) if img_shape is not None else None
        self.device = device

    def alloc(self) -> List[torch.Tensor]:
        bufs = [torch.zeros(_HEADER + self.capacity, dtype=torch.int64, device=self.device),
                torch.zeros((self.capacity, *self.act_shape), dtype=torch.float32, device=self.device)]
        if self.img_shape is not None:
            bufs.append(torch.zeros((self.capacity, *self.img_shape), dtype=torch.float32, device=self.device))
        return bufs

    def pack_into(self, bufs: List[torch.Tensor], kind: int, step: int, act: Optional[torch.Tensor],
                  target: Optional[torch.Tensor], img: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Write one batch (or an END/STOP marker) into ``bufs``, padded to ``capacity``."""
        b = 0 if act is None else int(act.shape[0])
        if b > self.capacity:
            raise RuntimeError(f"a batch of {b} exceeds the pipeline's message size {self.capacity}")
        code = _DTYPES.index(act.dtype) if act is not None and act.dtype in _DTYPES else 0
        bufs[0][:_HEADER] = torch.tensor([kind, step, b, code], dtype=torch.int64)
        if b:
            if tuple(act.shape[1:]) != self.act_shape:
                raise RuntimeError(f"stage output has shape {tuple(act.shape[1:])} per sample but the plan says "
                                   f"{self.act_shape}; the pipeline needs the plan's shapes (trace at this input size)")
            bufs[0][_HEADER:_HEADER + b] = target
            bufs[1][:b] = act
            if img is not None and len(bufs) > 2:
                bufs[2][:b] = img
        return bufs

    @staticmethod
    def unpack(bufs: List[torch.Tensor], device: torch.device
               ) -> Tuple[int, int, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        kind, step, b, code = bufs[0][:_HEADER].tolist()
        if kind != BATCH:
            return kind, step, None, None, None
        act = bufs[1][:b].to(device=device, dtype=_DTYPES[code])
        target = bufs[0][_HEADER:_HEADER + b].to(device)
        img = bufs[2][:b].to(device) if len(bufs) > 2 else None
        return kind, step, act, target, img


class _Inbox:
    """Receives from the previous stage, one message ahead, into two alternating buffers."""

    def __init__(self, wire: _Wire, src: int, group: Optional[Any]) -> None:
        self.src, self.group = src, group
        self.buffers = [wire.alloc(), wire.alloc()]
        self.slot = 0
        self.pending: Optional[List[Any]] = None

    def post(self) -> None:
        self.pending = [dist.irecv(t, src=self.src, group=self.group) for t in self.buffers[self.slot]]

    def take(self) -> List[torch.Tensor]:
        if self.pending is None:
            self.post()
        for work in self.pending:
            work.wait()
        bufs = self.buffers[self.slot]
        self.slot ^= 1
        self.pending = None
        return bufs


class _Outbox:
    """Sends to the next stage from two alternating buffers, at most two messages in flight."""

    def __init__(self, wire: _Wire, dst: int, group: Optional[Any]) -> None:
        self.wire, self.dst, self.group = wire, dst, group
        self.buffers = [wire.alloc(), wire.alloc()]
        self.slot = 0
        self.in_flight: List[List[Any]] = []

    def send(self, kind: int, step: int, act: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
             img: Optional[torch.Tensor] = None) -> None:
        if len(self.in_flight) >= 2:  # the oldest send still reads the buffer this message goes into
            for work in self.in_flight.pop(0):
                work.wait()
        msg = self.wire.pack_into(self.buffers[self.slot], kind, step, act, target, img)
        self.slot ^= 1
        self.in_flight.append([dist.isend(t, dst=self.dst, group=self.group) for t in msg])

    def flush(self) -> None:
        while self.in_flight:
            for work in self.in_flight.pop(0):
                work.wait()


class Stage:
    """The layers one process trains, and its links to the stages before and after it.

    Args:
        lm: the whole LocalModel (only ``layers`` are trained or must be on ``device`` here).
        layers: this stage's local layers, contiguous and in order.
        prev_rank / next_rank: global ranks of the neighbouring stages (None for the first / last stage).
        optimizer: per-layer optimizer with ``after_backward(k)`` over (at least) this stage's layers.
        capacity: the largest batch a message carries (the training or evaluation batch size).
        seed: the run's seed, for the per-layer random streams.
        group: the process group the ranks belong to (None: the default group).
        stop_group: stage 0's data-parallel group, over which replicas agree on stopping at the same step.
    """

    def __init__(self, lm: nn.Module, *, layers: Sequence[int], prev_rank: Optional[int], next_rank: Optional[int],
                 optimizer: Any, capacity: int, device: torch.device, seed: int, group: Optional[Any] = None,
                 stop_group: Optional[Any] = None, loss_fn: Optional[Callable] = None, scaler: Optional[Any] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 input_shape: Optional[Sequence[int]] = None, comm_device: Optional[torch.device] = None) -> None:
        self.lm, self.layers = lm, list(layers)
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.optimizer, self.device, self.seed = optimizer, device, seed
        self.group, self.stop_group = group, stop_group
        self.loss_fn, self.scaler, self.mean, self.std, self.autocast = loss_fn, scaler, mean, std, autocast
        self.needs_input = bool(getattr(lm.rule, "needs_input", False))
        plan = lm.plan
        # gloo moves CPU tensors only; NCCL moves device tensors.
        self.comm_device = comm_device or device
        img_shape = tuple(input_shape or plan.config["input_size"]) if self.needs_input else None
        self._img_shape = img_shape
        self._inboxes: dict = {}
        self._outboxes: dict = {}
        self.capacity = capacity

    @property
    def first(self) -> bool:
        return self.prev_rank is None

    @property
    def last(self) -> bool:
        return self.next_rank is None

    def _inbox_for(self, capacity: int) -> _Inbox:
        if capacity not in self._inboxes:
            shape = self.lm.plan.layers[self.layers[0] - 1].out_shape
            wire = _Wire(capacity=capacity, act_shape=shape, img_shape=self._img_shape, device=self.comm_device)
            self._inboxes[capacity] = _Inbox(wire, self.prev_rank, self.group)
        return self._inboxes[capacity]

    def _outbox_for(self, capacity: int) -> Optional[_Outbox]:
        if self.next_rank is None:
            return None
        if capacity not in self._outboxes:
            shape = self.lm.plan.layers[self.layers[-1]].out_shape
            wire = _Wire(capacity=capacity, act_shape=shape, img_shape=self._img_shape, device=self.comm_device)
            self._outboxes[capacity] = _Outbox(wire, self.next_rank, self.group)
        return self._outboxes[capacity]

    def _agree_stop(self, stop: bool) -> bool:
        """Stage 0's data-parallel replicas stop at the same step (one tiny all-reduce per step)."""
        if self.stop_group is None:
            return stop
        flag = torch.tensor([int(stop)], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.stop_group)
        return bool(flag.item())

    def _source(self, batches: Optional[Iterable], first_step: int, capacity: int,
                should_stop: Callable[[], bool]) -> Iterator[Tuple[int, int, Any, Any, Any]]:
        """(kind, step, x, target, image) from the data (stage 0) or from the previous stage."""
        if self.first:
            step = first_step
            iterator = iter(batches)
            while True:
                if self._agree_stop(should_stop()):
                    yield STOP, step, None, None, None
                    return
                try:
                    x, y = next(iterator)
                except StopIteration:
                    yield END, step, None, None, None
                    return
                yield BATCH, step, x, y, x
                step += 1
        else:
            inbox = self._inbox_for(capacity)
            while True:
                kind, step, x, y, img = _Wire.unpack(inbox.take(), self.device)
                if kind == BATCH:
                    inbox.post()  # the next message lands in the other buffer while this batch trains
                yield kind, step, x, y, img
                if kind != BATCH:
                    return

    def train_stream(self, batches: Optional[Iterable] = None, *, first_step: int,
                     should_stop: Callable[[], bool] = lambda: False,
                     on_step: Optional[Callable[[int, List[torch.Tensor], int], None]] = None) -> StreamResult:
        """Train on batches until the end of the stream; stage 0 reads ``batches`` (``(x, y)`` on the device).

        ``first_step`` is the global step of the first batch (for the random streams); ``should_stop()`` is read
        by stage 0 before each batch, and a stop travels down the pipeline after the batches already sent.
        ``on_step(step, losses, batch)`` is called after each trained batch (progress, fp16 bookkeeping).
        """
        result = StreamResult(loss_sums=torch.zeros(len(self.layers), dtype=torch.float64, device=self.device))
        outbox = self._outbox_for(self.capacity)
        for kind, step, x, y, img in self._source(batches, first_step, self.capacity, should_stop):
            if kind != BATCH:
                if outbox is not None:
                    outbox.send(kind, step)
                result.end = kind
                break
            inputs = img if self.needs_input else None
            out, losses = train_layers(self.lm, self.layers, x, y, step=step, seed=self.seed,
                                       optimizer=self.optimizer, loss_fn=self.loss_fn, scaler=self.scaler,
                                       inputs=inputs, mean=self.mean, std=self.std, autocast=self.autocast)
            if outbox is not None:
                outbox.send(BATCH, step, out, y, inputs)
            if self.scaler is not None:
                self.scaler.update()
            stacked = torch.stack(losses).float()
            batch = int(y.shape[0])
            if self.scaler is not None and not bool(torch.isfinite(stacked).all()):
                result.skipped += 1  # fp16 overflow: the scaler skipped the step; keep it out of the averages
            else:
                result.loss_sums += stacked.double() * batch
                result.samples += batch
            result.steps += 1
            if on_step is not None:
                on_step(step, losses, batch)
        if outbox is not None:
            outbox.flush()
        return result

    @torch.no_grad()
    def eval_stream(self, batches: Optional[Iterable] = None, *, capacity: int,
                    head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> StreamResult:
        """Forward-only pass over the evaluation batches: per-layer correct counts of this stage's layers
        (the aux nets' predictions, the head's for the last layer) and, on the last stage, the head's loss."""
        lm = self.lm
        last = len(lm.layers) - 1
        result = StreamResult(correct=torch.zeros(len(self.layers), dtype=torch.float64, device=self.device))
        outbox = self._outbox_for(capacity)
        for kind, step, x, y, img in self._source(batches, 0, capacity, lambda: False):
            if kind != BATCH:
                if outbox is not None:
                    outbox.send(kind, step)
                break
            with self.autocast():
                for i, k in enumerate(self.layers):
                    x = lm.layers[k](x)
                    logits = x if k == last else lm.aux[k](x)
                    result.correct[i] += (logits.argmax(dim=1) == y).sum()
                if self.last:
                    result.head_loss_sum += float(head_loss(x.float(), y))
            if outbox is not None:
                outbox.send(BATCH, step, x, y, img)
            result.samples += int(y.shape[0])
            result.steps += 1
        if outbox is not None:
            outbox.flush()
        return result
