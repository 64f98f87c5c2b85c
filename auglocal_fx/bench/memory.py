"""The benchmark's memory probes: byte sizes, the measured peak of a step, and the accounted split of that peak.

A step's peak is *measured*: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated when the step
began; on the CPU the process's peak RSS increase over the step (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs``, after ``malloc_trim`` hands freed memory back, and with glibc's mmap threshold pinned
(:func:`pin_mmap_threshold`) so that, like ``max_memory_allocated``, it follows live tensors rather than allocator
caching). It is also *accounted*: :class:`StepMemoryTracker` follows every tensor autograd saves for backward and
every parameter gradient, so the peak splits into activations, gradients and the rest (temporaries, slack).

Example::

    window, tracker = PeakWindow(torch.device("cpu")), StepMemoryTracker(list(lm.parameters()), exclude=[x, y])
    with window, tracker:
        lm.local_step(x, y)
    window.increase, tracker.peak_bytes, tracker.peak_grad_bytes
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .._malloc import release_free_memory, reset_peak_rss, set_mmap_threshold, status_bytes
from ..memory import SavedTensorTracker

__all__ = [
    "MiB", "GiB", "parse_bytes", "format_bytes", "tensor_bytes", "pin_mmap_threshold", "unpin_mmap_threshold",
    "reset_peak_rss", "PeakWindow", "StepMemoryTracker", "state_account",
]

MiB = 2**20
GiB = 2**30


# ------------------------------------------------------------------------------------------------ bytes
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"8GiB"`` -> 8589934592, ``"8GB"`` -> 8e9, ``"512MiB"``, ``"1.5G"`` (G, M, K alone are decimal)."""
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a memory size such as 8GiB, 8GB or 512MiB, got {text!r}")
    return int(value * _UNITS[unit])


def format_bytes(num: Optional[float]) -> str:
    if num is None:
        return "-"
    if abs(num) >= GiB:
        return f"{num / GiB:.2f} GiB"
    return f"{num / MiB:.1f} MiB"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (str(t.device), t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# ------------------------------------------------------------------------------------------------ process memory
def pin_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation above ``nbytes`` with its own mmap, returned to the OS when freed
    (as ``MALLOC_MMAP_THRESHOLD_=131072`` would). By default glibc raises that threshold up to 32 MiB as large
    blocks are freed and then keeps freed memory resident, so a step's RSS would also count allocator caching
    (measured here: +25% over the live tensors for BP, +60% for AugLocal on resnet50 at batch 8). Called by the memory
    probe, after the timed steps; :func:`unpin_mmap_threshold` then sets the threshold to 32 MiB, where glibc's
    dynamic threshold settles during training (the dynamic mode itself cannot be switched back on)."""
    return set_mmap_threshold(nbytes)


def unpin_mmap_threshold() -> bool:
    return set_mmap_threshold(32 * MiB)


class PeakWindow:
    """Peak memory the code inside the window adds on top of what was alive when it began (bytes).

    CUDA: ``max_memory_allocated`` (exact, every tensor). CPU: peak RSS increase (``available`` is False where
    /proc cannot be reset, e.g. not on Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.increase: Optional[int] = None
        self.process_peak: Optional[int] = None
        self.available = True
        self.allocator_pinned = False

    def __enter__(self) -> "PeakWindow":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self.allocator_pinned = pin_mmap_threshold()
            release_free_memory()
            self.available = reset_peak_rss()
            self._base = status_bytes("VmRSS")
            self.available = self.available and self._base is not None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.increase = max(0, peak - self._base)
            self.process_peak = peak
        else:
            if self.available:
                hwm = status_bytes("VmHWM")
                self.increase = max(0, hwm - self._base) if hwm is not None else None
                self.process_peak = hwm
            if self.allocator_pinned:
                unpin_mmap_threshold()

    @property
    def measured_by(self) -> Optional[str]:
        if self.device.type == "cuda":
            return "cuda.max_memory_allocated"
        if not self.available:
            return None
        return "peak RSS increase (VmHWM" + (", glibc mmap threshold pinned at 128 KiB)" if self.allocator_pinned else ")")


# ------------------------------------------------------------------------------------------------ step tracker
class StepMemoryTracker(SavedTensorTracker):
    """Saved-for-backward activations and parameter gradients on one timeline.

    ``peak_bytes``: saved activations at their worst moment (as SavedTensorTracker); ``peak_grad_bytes``: parameter
    gradients alive at once; ``peak_step_bytes``: the worst moment of both together. Tensors in ``exclude`` (the
    input batch, counted apart) are not counted. Gradients are counted when they are first accumulated in a step
    (``register_post_accumulate_grad_hook``) and released by :meth:`grads_released` (the caller drops them).
    ``mark(k)`` records the activation window of layer ``k`` (its peak, and what was alive when it began).

    Activations that ``torch.utils.checkpoint`` recomputes during backward are held by the checkpoint itself, not
    through these hooks: for a checkpointed step the tracker sees the stored segment inputs and the last segment.
    """

    def __init__(self, params: Sequence[nn.Parameter] = (), exclude: Sequence[torch.Tensor] = ()):
        super().__init__()
        self._exclude = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
        self._params = [p for p in params if p.requires_grad]
        self._grad_live: Dict[int, int] = {}
        self.grad_bytes = 0
        self.peak_grad_bytes = 0
        self.peak_step_bytes = 0
        self.activations_at_step_peak = 0
        self.grads_at_step_peak = 0
        self.windows: List[Dict[str, int]] = []
        self._window_peak = 0
        self._window_start = (0, 0)
        self._handles: List[Any] = []

    def _update(self) -> None:
        self._window_peak = max(self._window_peak, self.current_bytes)
        total = self.current_bytes + self.grad_bytes
        if total > self.peak_step_bytes:
            self.peak_step_bytes = total
            self.activations_at_step_peak = self.current_bytes
            self.grads_at_step_peak = self.grad_bytes

    def _pack(self, tensor: torch.Tensor):
        if not (tensor.is_leaf and tensor.requires_grad) and self._exclude:
            if (str(tensor.device), tensor.untyped_storage().data_ptr()) in self._exclude:
                return tensor
        packed = super()._pack(tensor)
        self._update()
        return packed

    def _grad_hook(self, p: torch.Tensor) -> None:
        if id(p) not in self._grad_live and p.grad is not None:
            nbytes = p.grad.untyped_storage().nbytes()
            self._grad_live[id(p)] = nbytes
            self.grad_bytes += nbytes
            self.peak_grad_bytes = max(self.peak_grad_bytes, self.grad_bytes)
            self._update()

    def grads_released(self, params: Optional[Iterable[torch.Tensor]] = None) -> None:
        for p in self._params if params is None else params:
            self.grad_bytes -= self._grad_live.pop(id(p), 0)

    def mark(self, k: int) -> None:
        """End layer ``k``'s window (call once its gradients are stepped and dropped); the next one begins."""
        self.windows.append(
            {"layer": k, "activation_peak": self._window_peak, "carried_in_activations": self._window_start[0],
             "carried_in_grads": self._window_start[1]}
        )
        self._window_peak = self.current_bytes
        self._window_start = (self.current_bytes, self.grad_bytes)

    def __enter__(self) -> "StepMemoryTracker":
        for p in self._params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------------------ parameter state
def _optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor]) -> int:
    wanted = {id(p) for p in params}
    tensors = []
    for opt in optimizers:
        for p, state in opt.state.items():
            if id(p) in wanted:
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return tensor_bytes(tensors)


def state_account(lm: nn.Module, optimizers: Sequence[torch.optim.Optimizer], *, with_aux: bool) -> Dict[str, int]:
    """Weights and buffers, and optimizer state, of the backbone and (``with_aux``) of the aux nets, exactly."""
    bb_params = lm.backbone_parameters()
    bb_buffers = list(lm.layers.buffers())
    account = {
        "backbone_weights": tensor_bytes(bb_params + bb_buffers),
        "backbone_optimizer": _optimizer_state_bytes(optimizers, bb_params),
        "aux_weights": 0,
        "aux_optimizer": 0,
    }
    if with_aux:
        aux_params = lm.aux_parameters()
        account["aux_weights"] = tensor_bytes(aux_params + list(lm.aux.buffers()))
        account["aux_optimizer"] = _optimizer_state_bytes(optimizers, aux_params)
    account["total"] = sum(account.values())
    return account
