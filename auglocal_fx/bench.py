"""Benchmark AugLocal against end-to-end backprop, in one process, on the same model, batch and data.

:func:`run_benchmark` alternates BP steps (``LocalModel.bp_step`` through the very same layers) and AugLocal steps
(``LocalModel.local_step``) after a warm-up and reports, for each: the median and spread of the step time,
images/s, the peak memory with everything counted, and the FLOPs per step (backbone and aux nets apart); then the
ratios AugLocal/BP and AugLocal's step time against its compute-proportional ideal,
``BP time * (AugLocal step FLOPs) / (BP step FLOPs)``.

What "peak memory, everything counted" means here (the same for both methods):

    peak = parameter state (weights and buffers, optimizer state, per group backbone / aux)
         + the input batch
         + the step's own peak: saved activations, parameter gradients, temporaries

* BP owns the backbone only (it needs no aux net); AugLocal owns the backbone and the aux nets.
* Parameter state is counted exactly from the tensors (``optimizer.state`` included).
* The step's own peak is *measured*: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated when the
  step began; on the CPU the process's peak RSS increase over the step (``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs``, after ``malloc_trim`` hands freed memory back, so earlier steps' cached memory is not
  reused unseen, and with glibc's mmap threshold pinned (:func:`pin_mmap_threshold`) so that, like
  ``max_memory_allocated``, it follows live tensors rather than allocator caching). Both methods run in the same process, so each one's baseline holds the other's optimizer state:
  measuring the increase and adding each method's own state keeps them apart.
* It is also *accounted*: :class:`StepMemoryTracker` follows every tensor autograd saves for backward
  (:class:`~auglocal_fx.memory.SavedTensorTracker`) and every parameter gradient, so the peak splits into
  activations, gradients and the rest (temporaries, allocator slack).

AugLocal's default step is the memory-lean one: each layer's optimizer (over ``lm.local_parameters(k)``) steps
in ``after_backward(k)`` and its gradients are dropped at once, so only one layer's gradients ever exist. Since no
gradient crosses a layer boundary this is the same update as one optimizer stepped after the whole
``local_step``; ``layer_step=False`` measures that variant (every gradient alive at the end).

Example::

    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=9, input_size=(3, 32, 32))
    result = run_benchmark(lm, BenchConfig(batch=32, steps=5))
    print(format_report(result))          # a table; result is JSON-able (write_json), write_plot draws a PNG
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._malloc import release_free_memory, set_mmap_threshold
from .local_model import LocalModel
from .memory import SavedTensorTracker

__all__ = [
    "BenchConfig",
    "run_benchmark",
    "benchmark_model",
    "count_step_flops",
    "StepMemoryTracker",
    "make_optimizer",
    "LayerwiseOptimizer",
    "format_report",
    "write_json",
    "write_plot",
    "parse_bytes",
    "format_bytes",
    "time_convert",
]

MiB = 2**20
GiB = 2**30


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class BenchConfig:
    batch: int
    steps: int = 5  # timed steps of each method
    warmup: int = 1  # untimed steps of each method first
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast (CPU and CUDA)
    optimizer: str = "sgd"  # "sgd" (momentum), "adamw" or "sgd-nomomentum"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    layer_step: bool = True  # AugLocal: step and free each layer's gradients right after its backward
    channels_last: bool = False
    memory_probe: bool = True  # one extra, untimed step of each method with memory instrumentation
    flops_batch: int = 2  # FLOPs are counted on this many samples and scaled (they are linear in the batch)
    seed: int = 0
    run_bp: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError("batch and steps must be >= 1 and warmup >= 0")
        if self.optimizer not in ("sgd", "adamw", "sgd-nomomentum"):
            raise ValueError(f"optimizer must be sgd, adamw or sgd-nomomentum, got {self.optimizer!r}")


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


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
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


def _status_bytes(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakWindow:
    """Peak memory the code inside the window adds on top of what was alive when it began (bytes).

    CUDA: ``max_memory_allocated`` (exact, every tensor). CPU: peak RSS increase (``available`` is False where
    /proc cannot be reset, e.g. not on Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.increase: Optional[int] = None
        self.process_peak: Optional[int] = None
        self.available = True
        self.allocator_pinned = False

    def __enter__(self) -> "_PeakWindow":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self.allocator_pinned = pin_mmap_threshold()
            release_free_memory()
            self.available = reset_peak_rss()
            self._base = _status_bytes("VmRSS")
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
                hwm = _status_bytes("VmHWM")
                self.increase = max(0, hwm - self._base) if hwm is not None else None
                self.process_peak = hwm
            if self.allocator_pinned:
                unpin_mmap_threshold()


# ------------------------------------------------------------------------------------------------ step tracker
class StepMemoryTracker(SavedTensorTracker):
    """Saved-for-backward activations and parameter gradients on one timeline.

    ``peak_bytes``: saved activations at their worst moment (as SavedTensorTracker); ``peak_grad_bytes``: parameter
    gradients alive at once; ``peak_step_bytes``: the worst moment of both together. Tensors in ``exclude`` (the
    input batch, counted apart) are not counted. Gradients are counted when they are first accumulated in a step
    (``register_post_accumulate_grad_hook``) and released by :meth:`grads_released` (the caller drops them).
    ``mark(k)`` records the activation window of layer ``k`` (its peak, and what was alive when it began).
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


# ------------------------------------------------------------------------------------------------ optimizers
def make_optimizer(params: Sequence[nn.Parameter], config: BenchConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``params``; the fused kernel where torch has one (one pass, no temporaries:
    on the CPU here 4-10x faster than the per-tensor loop), the same for BP and AugLocal."""
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "adamw":
        make = lambda **kw: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **kw)  # noqa: E731
    else:
        momentum = 0.0 if config.optimizer == "sgd-nomomentum" else config.momentum
        make = lambda **kw: torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay, **kw)  # noqa: E731
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return make(fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return make()


def _optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor]) -> int:
    wanted = {id(p) for p in params}
    tensors = []
    for opt in optimizers:
        for p, state in opt.state.items():
            if id(p) in wanted:
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return _tensor_bytes(tensors)


class LayerwiseOptimizer:
    """One optimizer per local layer (over ``lm.local_parameters(k)``), stepped as soon as that layer has its
    gradients; the gradients are dropped at once. Pass :meth:`after_backward` to ``local_step``.

    Because layer ``k``'s parameters receive gradient from loss ``k`` only, the update equals one optimizer
    stepped after the whole ``local_step``; but only one layer's gradients are ever alive.
    """

    def __init__(self, lm: LocalModel, make: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer],
                 on_release: Optional[Callable[[Sequence[nn.Parameter]], None]] = None):
        groups = [lm.local_parameters(k) for k in range(len(lm.layers))]
        seen: Dict[int, int] = {}
        for k, group in enumerate(groups):
            for p in group:
                if p.requires_grad and seen.setdefault(id(p), k) != k:
                    raise ValueError(
                        f"a parameter is shared by local layers {seen[id(p)]} and {k} (tied weights): stepping it "
                        "per layer would update it before every gradient has arrived; use one optimizer instead"
                    )
        self.params = [[p for p in g if p.requires_grad] for g in groups]
        self.optimizers = [make(g) for g in self.params]
        self.on_release = on_release

    def after_backward(self, k: int) -> None:
        self.optimizers[k].step()
        for p in self.params[k]:
            p.grad = None
        if self.on_release is not None:
            self.on_release(self.params[k])


# ------------------------------------------------------------------------------------------------ FLOPs
class _FlopTotal:
    """Sums FLOPs over several ``with`` blocks (FlopCounterMode forgets its counts each time it is entered)."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def __call__(self):
        from ._shapes import total_flop_counter

        counter = total_flop_counter()
        try:
            with counter:
                yield
        finally:
            self.total += int(counter.get_total_flops())


def count_step_flops(lm: LocalModel, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
    """FLOPs of one training step on ``x`` (forward and backward; ``torch.utils.flop_counter``).

    ``bp``: end-to-end BP. ``local_backbone`` / ``local_aux``: AugLocal's step split into the local layers'
    work and the aux nets' (each aux net's backward is run apart, down to the layer output's gradient, so the two
    are told apart exactly). Gradients are left at None.
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
            F.cross_entropy(lm.aux[k](cut), y).backward()
        with backbone():
            out.backward(cut.grad)
        h = out.detach()
        del out, cut
    lm.zero_grad(set_to_none=True)
    return {
        "bp": bp.total,
        "local_backbone": backbone.total,
        "local_aux": aux.total,
    }


# ------------------------------------------------------------------------------------------------ the benchmark
def _state_account(lm: LocalModel, optimizers: Sequence[torch.optim.Optimizer], *, with_aux: bool) -> Dict[str, int]:
    bb_params = lm.backbone_parameters()
    bb_buffers = list(lm.layers.buffers())
    account = {
        "backbone_weights": _tensor_bytes(bb_params + bb_buffers),
        "backbone_optimizer": _optimizer_state_bytes(optimizers, bb_params),
        "aux_weights": 0,
        "aux_optimizer": 0,
    }
    if with_aux:
        aux_params = lm.aux_parameters()
        account["aux_weights"] = _tensor_bytes(aux_params + list(lm.aux.buffers()))
        account["aux_optimizer"] = _optimizer_state_bytes(optimizers, aux_params)
    account["total"] = sum(account.values())
    return account


def _summary(times: List[float]) -> Dict[str, float]:
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "spread": (max(times) - min(times)) / med if med > 0 else 0.0,
        "times_s": list(times),
    }


class _Runner:
    """Both methods' step functions over one LocalModel, batch and data."""

    def __init__(self, lm: LocalModel, config: BenchConfig, x: torch.Tensor, y: torch.Tensor):
        self.lm, self.config, self.x, self.y = lm, config, x, y
        self.device = x.device
        make = lambda params: make_optimizer(params, config)  # noqa: E731
        self.bp_optimizer = make(lm.backbone_parameters())
        self.tracker: Optional[StepMemoryTracker] = None
        if config.layer_step:
            self.layerwise = LayerwiseOptimizer(lm, make, on_release=self._released)
            self.local_optimizers = self.layerwise.optimizers
        else:
            self.layerwise = None
            self.local_optimizers = [make(list(lm.parameters()))]

    def _released(self, params: Sequence[nn.Parameter]) -> None:
        if self.tracker is not None:
            self.tracker.grads_released(params)

    def _autocast(self):
        if not self.config.amp:
            return contextlib.nullcontext()
        # No weight-cast cache: it keeps a bfloat16 copy of every weight used until the autocast region exits, i.e.
        # of every aux net until the end of local_step (+380 MiB for resnet50 K=17); BP uses each weight once.
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def prepare(self) -> None:
        """Drop every gradient (both methods'), before a step and outside its timing and memory window."""
        self.lm.zero_grad(set_to_none=True)
        if self.tracker is not None:
            self.tracker.grads_released()

    def bp_step(self) -> None:
        with self._autocast():
            self.lm.bp_step(self.x, self.y)
        self.bp_optimizer.step()

    def local_step(self) -> None:
        after: Optional[Callable[[int], None]] = None
        if self.layerwise is not None:
            tracker = self.tracker

            def after_layer(k: int) -> None:
                self.layerwise.after_backward(k)
                if tracker is not None:
                    tracker.mark(k)

            after = after_layer

        elif self.tracker is not None:
            after = self.tracker.mark
        with self._autocast():
            self.lm.local_step(self.x, self.y, after_backward=after)
        if self.layerwise is None:
            self.local_optimizers[0].step()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, step: Callable[[], None]) -> Tuple[float, float, Optional[int]]:
        self.prepare()
        cuda = self.device.type == "cuda"
        if cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        self._sync()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = torch.cuda.max_memory_allocated(self.device) - base if cuda else None
        return elapsed, cpu, peak

    def probe(self, step: Callable[[], None], params: Sequence[nn.Parameter]) -> Dict[str, Any]:
        """One untimed step with memory instrumentation: tracked activations/gradients and the measured peak."""
        self.prepare()
        tracker = StepMemoryTracker(params, exclude=[self.x, self.y])
        window = _PeakWindow(self.device)
        self.tracker = tracker
        try:
            with window, tracker:
                step()
        finally:
            self.tracker = None
        return {
            "activations_peak": tracker.peak_bytes,
            "grads_peak": tracker.peak_grad_bytes,
            "step_tracked_peak": tracker.peak_step_bytes,
            "activations_at_step_peak": tracker.activations_at_step_peak,
            "grads_at_step_peak": tracker.grads_at_step_peak,
            "measured_step_increase": window.increase,
            "measured_by": "cuda.max_memory_allocated" if self.device.type == "cuda" else (
                ("peak RSS increase (VmHWM" + (", glibc mmap threshold pinned at 128 KiB)" if window.allocator_pinned
                                               else ")")) if window.available else None),
            "process_peak": window.process_peak,
            "windows": tracker.windows,
        }


def _method_report(times: List[float], cpu_times: List[float], cuda_peaks: List[Optional[int]], probe: Optional[Dict[str, Any]],
                   state: Dict[str, int], batch_bytes: int, batch: int, flops: Dict[str, int]) -> Dict[str, Any]:
    timing = _summary(times)
    timing["images_per_s"] = batch / timing["median_s"]
    timing["cpu"] = _summary(cpu_times)  # process CPU time (all threads): steadier than wall time on a shared CPU
    memory: Dict[str, Any] = {"state": state, "batch_bytes": batch_bytes}
    if probe is not None:
        memory.update({k: v for k, v in probe.items() if k != "windows"})
        memory["accounted_peak"] = state["total"] + batch_bytes + probe["step_tracked_peak"]
        inc = probe["measured_step_increase"]
        if cuda_peaks and all(p is not None for p in cuda_peaks):
            inc = max(cuda_peaks + ([inc] if inc is not None else []))
            memory["measured_step_increase"] = inc
        if inc is not None:
            memory["measured_peak"] = state["total"] + batch_bytes + inc
            memory["other_at_peak"] = inc - probe["step_tracked_peak"]
        memory["peak"] = memory.get("measured_peak", memory["accounted_peak"])
        memory["activation_share_of_peak"] = probe["activations_at_step_peak"] / memory["peak"]
        memory["state_share_of_peak"] = state["total"] / memory["peak"]
    return {"time": timing, "memory": memory, "flops_per_step": flops}


def _machine(device: torch.device) -> Dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(lm: LocalModel, config: BenchConfig, *, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Alternate BP and AugLocal steps on ``lm`` (moved to ``config.device``) and return a JSON-able report."""
    say = progress or (lambda _msg: None)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device on this machine")
    plan = lm.plan
    lm.to(device)
    lm.train()
    if config.channels_last:
        lm.to(memory_format=torch.channels_last)
    size = tuple(plan.config["input_size"])
    classes = int(plan.head.out_shape[0])
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((config.batch, *size), generator=gen)
    y = torch.randint(0, classes, (config.batch,), generator=gen)
    x, y = x.to(device), y.to(device)
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    batch_bytes = _tensor_bytes([x, y])

    # FLOPs: counted on a small batch, scaled to the benchmark's (conv/linear/matmul FLOPs are linear in it).
    fb = max(1, min(config.flops_batch, config.batch))
    say(f"counting FLOPs on {fb} samples")
    raw = count_step_flops(lm, x[:fb], y[:fb])
    flops = {k: v * config.batch // fb for k, v in raw.items()}
    flops["local_total"] = flops["local_backbone"] + flops["local_aux"]
    fwd_backbone = sum(layer.flops for layer in plan.layers) * config.batch
    fwd_aux = sum(a.flops for a in plan.aux) * config.batch

    runner = _Runner(lm, config, x, y)
    methods = [("bp", runner.bp_step), ("auglocal", runner.local_step)] if config.run_bp else [("auglocal", runner.local_step)]
    for i in range(config.warmup):
        for name, step in methods:
            say(f"warm-up {i + 1}/{config.warmup}: {name}")
            runner.timed(step)
    times: Dict[str, List[float]] = {name: [] for name, _ in methods}
    cpu_times: Dict[str, List[float]] = {name: [] for name, _ in methods}
    cuda_peaks: Dict[str, List[Optional[int]]] = {name: [] for name, _ in methods}
    for i in range(config.steps):
        for name, step in methods if i % 2 == 0 else methods[::-1]:  # alternate which goes first
            elapsed, cpu, peak = runner.timed(step)
            times[name].append(elapsed)
            cpu_times[name].append(cpu)
            cuda_peaks[name].append(peak)
            say(f"step {i + 1}/{config.steps}: {name} {elapsed:.3f} s")
    probes: Dict[str, Optional[Dict[str, Any]]] = {name: None for name, _ in methods}
    if config.memory_probe:
        for name, step in methods:
            say(f"memory probe: {name}")
            params = lm.backbone_parameters() if name == "bp" else list(lm.parameters())
            probes[name] = runner.probe(step, params)
    runner.prepare()

    report: Dict[str, Any] = {
        "format": "auglocal-fx-bench",
        "version": 1,
        "model": (plan.source or {}).get("name"),
        "config": {**dataclasses.asdict(config), "layers": plan.num_layers, "aux_depth": plan.config["aux_depth"],
                   "pyramid": plan.config["pyramid"], "input_size": list(size), "num_classes": classes},
        "machine": _machine(device),
        "params": {"backbone": sum(p.numel() for p in lm.backbone_parameters()),
                   "aux": sum(p.numel() for p in lm.aux_parameters())},
        "flops": {**flops, "forward_backbone": fwd_backbone, "forward_aux": fwd_aux,
                  "aux_overhead_forward": fwd_aux / fwd_backbone if fwd_backbone else None,
                  "aux_overhead_step": flops["local_aux"] / flops["local_backbone"] if flops["local_backbone"] else None,
                  "counted_on_batch": fb},
    }
    if "bp" in times:
        report["bp"] = _method_report(times["bp"], cpu_times["bp"], cuda_peaks["bp"], probes["bp"],
                                      _state_account(lm, [runner.bp_optimizer], with_aux=False), batch_bytes,
                                      config.batch, {"backbone": flops["bp"], "aux": 0})
    report["auglocal"] = _method_report(times["auglocal"], cpu_times["auglocal"], cuda_peaks["auglocal"], probes["auglocal"],
                                        _state_account(lm, runner.local_optimizers, with_aux=True), batch_bytes,
                                        config.batch, {"backbone": flops["local_backbone"], "aux": flops["local_aux"]})
    if probes["auglocal"] is not None:
        windows = probes["auglocal"]["windows"]
        report["auglocal"]["memory"]["layer_windows"] = windows
        report["auglocal"]["memory"]["local_limit"] = max((w["activation_peak"] for w in windows), default=0)
        report["auglocal"]["memory"]["carried_across_layers"] = max(
            (w["carried_in_activations"] + w["carried_in_grads"] for w in windows), default=0)
    if "bp" in report:
        report["ratios"] = _ratios(report)
    return report


def _ratios(report: Dict[str, Any]) -> Dict[str, Optional[float]]:
    bp, al = report["bp"], report["auglocal"]
    f = report["flops"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    ideal_factor = f["local_total"] / f["bp"]
    ideal_factor_fwd = (f["forward_backbone"] + f["forward_aux"]) / f["forward_backbone"]
    bp_time, al_time = bp["time"]["median_s"], al["time"]["median_s"]
    out = {
        "step_time": ratio(al_time, bp_time),
        "images_per_s": ratio(al["time"]["images_per_s"], bp["time"]["images_per_s"]),
        "flops_per_step": ideal_factor,
        "ideal_step_time_s": bp_time * ideal_factor,
        "step_time_vs_ideal": al_time / (bp_time * ideal_factor),
        "step_time_vs_ideal_forward_flops": al_time / (bp_time * ideal_factor_fwd),
        "cpu_time": ratio(al["time"]["cpu"]["median_s"], bp["time"]["cpu"]["median_s"]),
        "cpu_time_vs_ideal": ratio(al["time"]["cpu"]["median_s"], bp["time"]["cpu"]["median_s"] * ideal_factor),
    }
    bm, am = bp["memory"], al["memory"]
    if "peak" in bm and "peak" in am:
        out.update({
            "peak_memory": ratio(am["peak"], bm["peak"]),
            "measured_peak": ratio(am.get("measured_peak"), bm.get("measured_peak")),
            "accounted_peak": ratio(am["accounted_peak"], bm["accounted_peak"]),
            "activations": ratio(am["activations_peak"], bm["activations_peak"]),
            "activations_vs_local_limit": ratio(am["activations_peak"], am.get("local_limit")),
        })
    return out


# ------------------------------------------------------------------------------------------------ whole pipeline
def time_convert(model: nn.Module, *, repeats: int = 1, **convert_kwargs) -> Tuple[LocalModel, List[float]]:
    """Convert ``model`` ``repeats`` times and return the last LocalModel and each wall time (seconds)."""
    from .convert import convert

    times, lm = [], None
    for _ in range(max(1, repeats)):
        lm = None
        t0 = time.perf_counter()
        lm = convert(model, **convert_kwargs)
        times.append(time.perf_counter() - t0)
    return lm, times


def benchmark_model(name: str, *, layers: int, config: BenchConfig, aux_depth: int = 2, pyramid: float = 0.5,
                    input_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                    progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Build model ``name`` (hub names: ``resnet50``, ``timm:...``, ``auglocal:resnet32``), convert and benchmark it."""
    from .hub import create_model

    torch.manual_seed(config.seed)
    model = create_model(name, num_classes=num_classes)
    lm, convert_times = time_convert(model, layers=layers, aux_depth=aux_depth, pyramid=pyramid, input_size=input_size)
    del model
    report = run_benchmark(lm, config, progress=progress)
    report["model"] = report.get("model") or name
    report["convert_s"] = convert_times[0]
    return report


# ------------------------------------------------------------------------------------------------ output
def write_json(report: Dict[str, Any], path: os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(report: Dict[str, Any]) -> str:
    """A plain-text table for people (the CLI prints it; the JSON holds everything)."""
    cfg = report["config"]
    lines = [
        f"{report.get('model') or 'model'}: K={cfg['layers']} aux depth {cfg['aux_depth']} pyramid {cfg['pyramid']}, "
        f"batch {cfg['batch']} x {'x'.join(str(v) for v in cfg['input_size'])}, {cfg['device']}"
        f"{' bf16 autocast' if cfg['amp'] else ''}{' channels_last' if cfg['channels_last'] else ''}, "
        f"{cfg['optimizer']} ({'per-layer step' if cfg['layer_step'] else 'one optimizer step'}), "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps each",
        f"params: backbone {report['params']['backbone'] / 1e6:.2f}M, aux nets {report['params']['aux'] / 1e6:.2f}M "
        f"({report['params']['aux'] / max(1, report['params']['backbone']):.2f}x the backbone)",
    ]
    methods = [m for m in ("bp", "auglocal") if m in report]
    rows = [("", *[m.upper() if m == "bp" else "AugLocal" for m in methods], "AugLocal/BP" if len(methods) == 2 else "")]
    r = report.get("ratios", {})

    def row(label, fn, ratio_key=None, fmt=str):
        vals = []
        for m in methods:
            try:
                v = fn(report[m])
            except (KeyError, TypeError):
                v = None
            vals.append("-" if v is None else fmt(v))
        rows.append((label, *vals, _pct(r.get(ratio_key)) if ratio_key else ""))

    sec = lambda v: f"{v:.3f} s"  # noqa: E731
    row("step time (median)", lambda m: m["time"]["median_s"], "step_time", sec)
    row("  spread (max-min)/median", lambda m: m["time"]["spread"], None, lambda v: f"{v:.1%}")
    row("process CPU time (median)", lambda m: m["time"]["cpu"]["median_s"], "cpu_time", sec)
    row("images/s", lambda m: m["time"]["images_per_s"], "images_per_s", lambda v: f"{v:.1f}")
    row("FLOPs/step backbone", lambda m: m["flops_per_step"]["backbone"], None, lambda v: f"{v / 1e9:.1f} G")
    row("FLOPs/step aux nets", lambda m: m["flops_per_step"]["aux"], None, lambda v: f"{v / 1e9:.1f} G")
    row("FLOPs/step total", lambda m: m["flops_per_step"]["backbone"] + m["flops_per_step"]["aux"], "flops_per_step",
        lambda v: f"{v / 1e9:.1f} G")
    row("peak memory (everything)", lambda m: m["memory"]["peak"], "peak_memory", format_bytes)
    row("  weights+buffers", lambda m: m["memory"]["state"]["backbone_weights"] + m["memory"]["state"]["aux_weights"], None, format_bytes)
    row("    of which aux nets", lambda m: m["memory"]["state"]["aux_weights"], None, format_bytes)
    row("  optimizer state", lambda m: m["memory"]["state"]["backbone_optimizer"] + m["memory"]["state"]["aux_optimizer"], None, format_bytes)
    row("    of which aux nets", lambda m: m["memory"]["state"]["aux_optimizer"], None, format_bytes)
    row("  input batch", lambda m: m["memory"]["batch_bytes"], None, format_bytes)
    row("  step: activations at peak", lambda m: m["memory"]["activations_at_step_peak"], None, format_bytes)
    row("  step: gradients at peak", lambda m: m["memory"]["grads_at_step_peak"], None, format_bytes)
    row("  step: other (temporaries)", lambda m: m["memory"]["other_at_peak"], None, format_bytes)
    row("activation peak (saved)", lambda m: m["memory"]["activations_peak"], "activations", format_bytes)
    row("gradient peak", lambda m: m["memory"]["grads_peak"], None, format_bytes)
    row("accounted peak (no temporaries)", lambda m: m["memory"]["accounted_peak"], "accounted_peak", format_bytes)
    widths = [max(len(str(rw[i])) for rw in rows) for i in range(len(rows[0]))]
    for i, rw in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(rw, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if r:
        lines.append(
            f"AugLocal step time {r['step_time_vs_ideal']:.2f}x its compute-proportional ideal "
            f"({r['ideal_step_time_s']:.3f} s = BP time x {r['flops_per_step']:.2f}, the step-FLOP ratio); "
            f"in process CPU time {r['cpu_time_vs_ideal']:.2f}x"
        )
    f = report["flops"]
    lines.append(f"aux FLOP overhead: {f['aux_overhead_forward']:.2f}x the backbone's forward FLOPs "
                 f"({f['aux_overhead_step']:.2f}x per training step)")
    mem = report["auglocal"]["memory"]
    if "local_limit" in mem:
        lines.append(
            f"AugLocal activation peak {format_bytes(mem['activations_peak'])} vs the local-learning limit (largest "
            f"layer + aux net footprint) {format_bytes(mem['local_limit'])}; carried across layers: "
            f"{format_bytes(mem['carried_across_layers'])}"
        )
    if mem.get("measured_by"):
        lines.append(f"step peaks measured by {mem['measured_by']} (plus each method's own state and the batch)")
    if "convert_s" in report:
        lines.append(f"convert: {report['convert_s']:.2f} s")
    return "\n".join(lines)


def write_plot(report: Dict[str, Any], path: os.PathLike) -> None:
    """A PNG: step time (with AugLocal's ideal) and peak memory split into its parts, BP vs AugLocal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("bp", "auglocal") if m in report]
    labels = ["BP" if m == "bp" else "AugLocal" for m in methods]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.2))
    med = [report[m]["time"]["median_s"] for m in methods]
    lo = [med[i] - report[m]["time"]["min_s"] for i, m in enumerate(methods)]
    hi = [report[m]["time"]["max_s"] - med[i] for i, m in enumerate(methods)]
    ax_t.bar(labels, med, yerr=[lo, hi], capsize=6, color=["#7f7f7f", "#1f77b4"][: len(methods)])
    if "ratios" in report:
        ideal = report["ratios"]["ideal_step_time_s"]
        ax_t.hlines(ideal, len(methods) - 1.4, len(methods) - 0.6, colors="#d62728", linestyles="--",
                    label=f"compute-proportional ideal ({report['ratios']['flops_per_step']:.2f}x BP)")
        ax_t.legend(loc="lower left", fontsize=8)
    ax_t.set_ylabel("step time (s), median and min-max")
    ax_t.set_title("step time")
    parts = [
        ("weights: backbone", lambda s, m: s["backbone_weights"], "#8c564b"),
        ("weights: aux nets", lambda s, m: s["aux_weights"], "#c49c94"),
        ("optimizer: backbone", lambda s, m: s["backbone_optimizer"], "#e377c2"),
        ("optimizer: aux nets", lambda s, m: s["aux_optimizer"], "#f7b6d2"),
        ("input batch", lambda s, m: m["batch_bytes"], "#bcbd22"),
        ("activations", lambda s, m: m.get("activations_at_step_peak", 0), "#1f77b4"),
        ("gradients", lambda s, m: m.get("grads_at_step_peak", 0), "#ff7f0e"),
        ("other", lambda s, m: max(0, m.get("other_at_peak", 0) or 0), "#c7c7c7"),
    ]
    bottom = [0.0] * len(methods)
    for name, fn, color in parts:
        vals = [fn(report[m]["memory"]["state"], report[m]["memory"]) / GiB if "state" in report[m]["memory"] else 0
                for m in methods]
        ax_m.bar(labels, vals, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    if "ratios" in report and report["ratios"].get("peak_memory"):
        ax_m.set_title(f"peak memory, everything counted (AugLocal/BP {report['ratios']['peak_memory']:.2f}x)")
    else:
        ax_m.set_title("peak memory, everything counted")
    ax_m.set_ylabel("GiB")
    ax_m.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"{report.get('model')} K={cfg['layers']} d={cfg['aux_depth']} tau={cfg['pyramid']} batch {cfg['batch']} "
                 f"{'x'.join(str(v) for v in cfg['input_size'])} on {cfg['device']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
