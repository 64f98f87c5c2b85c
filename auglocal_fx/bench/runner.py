"""Run the benchmark: every method in one process, on the same model, batch and data, alternating.

After a warm-up, the methods take turns (the order rotates each round), then each runs one more, untimed step
with memory instrumentation. The report holds, per method, the step time (median and spread, wall and process
CPU time), images/s, FLOPs per step (backbone and aux nets apart) and the peak memory, everything counted and
split; and each method's ratios to BP.

Example::

    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=9, input_size=(3, 32, 32))
    report = run_benchmark(lm, BenchConfig(batch=32, steps=5, methods=("bp", "checkpoint", "auglocal")))
    report["vs_bp"]["checkpoint"]["peak_memory"], report["vs_bp"]["auglocal"]["step_time"]
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpointing import predicted_peak
from ..local_model import LocalModel
from .flops import count_checkpoint_flops, count_step_flops
from .memory import PeakWindow, StepMemoryTracker, state_account, tensor_bytes
from .methods import BenchConfig, Method, build_methods

__all__ = ["run_benchmark", "benchmark_model", "time_convert"]


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


def _prepare(lm: LocalModel, config: BenchConfig, device: torch.device) -> LocalModel:
    lm.to(device)
    lm.train()
    if config.channels_last:
        lm.to(memory_format=torch.channels_last)
    return lm


def _compile(lm: LocalModel) -> None:
    # Module.compile() compiles in place: the module tree and state_dict keys stay as they are.
    for module in list(lm.layers) + list(lm.aux):
        module.compile()


class _Harness:
    """Times and probes the methods' steps; drops every gradient between steps, outside the measured windows."""

    def __init__(self, methods: Sequence[Method], x: torch.Tensor, y: torch.Tensor):
        self.methods, self.x, self.y, self.device = methods, x, y, x.device
        self.models = list({id(m.lm): m.lm for m in methods}.values())

    def prepare(self) -> None:
        for lm in self.models:
            lm.zero_grad(set_to_none=True)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, method: Method) -> Tuple[float, float, Optional[int]]:
        self.prepare()
        cuda = self.device.type == "cuda"
        if cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        method.step(self.x, self.y)
        self._sync()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = torch.cuda.max_memory_allocated(self.device) - base if cuda else None
        return elapsed, cpu, peak

    def probe(self, method: Method) -> Dict[str, Any]:
        """One untimed step with memory instrumentation: tracked activations/gradients and the measured peak."""
        self.prepare()
        tracker = StepMemoryTracker(method.params, exclude=[self.x, self.y])
        window = PeakWindow(self.device)
        with window, tracker:
            method.step(self.x, self.y, tracker)
        self.prepare()
        return {
            "activations_peak": tracker.peak_bytes,
            "grads_peak": tracker.peak_grad_bytes,
            "step_tracked_peak": tracker.peak_step_bytes,
            "activations_at_step_peak": tracker.activations_at_step_peak,
            "grads_at_step_peak": tracker.grads_at_step_peak,
            "measured_step_increase": window.increase,
            "measured_by": window.measured_by,
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
        windows = probe["windows"]
        if windows:  # a local rule: one window per layer
            memory["layer_windows"] = windows
            memory["local_limit"] = max(w["activation_peak"] for w in windows)
            memory["carried_across_layers"] = max(w["carried_in_activations"] + w["carried_in_grads"] for w in windows)
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


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _vs_bp(report: Dict[str, Any], name: str) -> Dict[str, Optional[float]]:
    """``name``'s figures over BP's; ``step_time_vs_ideal`` compares its time with BP's scaled by the FLOP ratio."""
    bp, m = report["bp"], report[name]
    flops = lambda r: r["flops_per_step"]["backbone"] + r["flops_per_step"]["aux"]  # noqa: E731
    ideal_factor = flops(m) / flops(bp)
    bp_time, time_ = bp["time"]["median_s"], m["time"]["median_s"]
    out = {
        "step_time": _ratio(time_, bp_time),
        "images_per_s": _ratio(m["time"]["images_per_s"], bp["time"]["images_per_s"]),
        "flops_per_step": ideal_factor,
        "ideal_step_time_s": bp_time * ideal_factor,
        "step_time_vs_ideal": time_ / (bp_time * ideal_factor),
        "cpu_time": _ratio(m["time"]["cpu"]["median_s"], bp["time"]["cpu"]["median_s"]),
        "cpu_time_vs_ideal": _ratio(m["time"]["cpu"]["median_s"], bp["time"]["cpu"]["median_s"] * ideal_factor),
    }
    bm, mm = bp["memory"], m["memory"]
    if "peak" in bm and "peak" in mm:
        out.update({
            "peak_memory": _ratio(mm["peak"], bm["peak"]),
            "measured_peak": _ratio(mm.get("measured_peak"), bm.get("measured_peak")),
            "accounted_peak": _ratio(mm["accounted_peak"], bm["accounted_peak"]),
            "activations": _ratio(mm["activations_peak"], bm["activations_peak"]),
            "activations_vs_local_limit": _ratio(mm["activations_peak"], mm.get("local_limit")),
        })
        out["memory_x_time"] = out["peak_memory"] * out["step_time"] if out["peak_memory"] is not None else None
    if name == "auglocal":
        f = report["flops"]
        ideal_fwd = (f["forward_backbone"] + f["forward_aux"]) / f["forward_backbone"]
        out["step_time_vs_ideal_forward_flops"] = time_ / (bp_time * ideal_fwd)
    return out


def run_benchmark(lm: LocalModel, config: BenchConfig, *, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Alternate the steps of ``config.methods`` on ``lm`` (moved to ``config.device``); return a JSON-able report."""
    say = progress or (lambda _msg: None)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device on this machine")
    cudnn_before = torch.backends.cudnn.benchmark
    if config.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    try:
        return _run(lm, config, device, say)
    finally:
        torch.backends.cudnn.benchmark = cudnn_before


def _run(lm: LocalModel, config: BenchConfig, device: torch.device, say: Callable[[str], None]) -> Dict[str, Any]:
    plan = lm.plan
    _prepare(lm, config, device)
    size = tuple(plan.config["input_size"])
    classes = int(plan.head.out_shape[0])
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((config.batch, *size), generator=gen)
    y = torch.randint(0, classes, (config.batch,), generator=gen)
    x, y = x.to(device), y.to(device)
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    batch_bytes = tensor_bytes([x, y])
    methods = build_methods(lm, config, device=device, prepare=lambda m: _prepare(m, config, device), progress=say)

    # FLOPs: counted on a small batch (before any compilation), scaled to the benchmark's (linear in the batch).
    fb = max(1, min(config.flops_batch, config.batch))
    say(f"counting FLOPs on {fb} samples")
    xf, yf = x[:fb], y[:fb]
    raw = count_step_flops(lm, xf, yf, mean=config.mean, std=config.std)
    scale = lambda v: v * config.batch // fb  # noqa: E731
    flops = {k: scale(v) for k, v in raw.items()}
    flops["local_total"] = flops["local_backbone"] + flops["local_aux"]
    fwd_backbone = sum(layer.flops for layer in plan.layers) * config.batch
    fwd_aux = sum(a.flops for a in plan.aux) * config.batch
    method_flops: Dict[str, Dict[str, int]] = {}
    for m in methods:
        if m.kind == "bp":
            method_flops[m.name] = {"backbone": flops["bp"], "aux": 0}
        elif m.kind == "checkpoint":
            method_flops[m.name] = {"backbone": scale(count_checkpoint_flops(m.info["checkpointed_bp"], xf, yf)), "aux": 0}
        else:
            own = raw if m.lm is lm else count_step_flops(m.lm, xf, yf, mean=config.mean, std=config.std)
            method_flops[m.name] = {"backbone": scale(own["local_backbone"]), "aux": scale(own["local_aux"])}
    if config.compile:
        say("compiling every local layer and aux net (torch.compile)")
        for model in {id(m.lm): m.lm for m in methods}.values():
            _compile(model)

    harness = _Harness(methods, x, y)
    for i in range(config.warmup):
        for m in methods:
            say(f"warm-up {i + 1}/{config.warmup}: {m.name}")
            harness.timed(m)
    times: Dict[str, List[float]] = {m.name: [] for m in methods}
    cpu_times: Dict[str, List[float]] = {m.name: [] for m in methods}
    cuda_peaks: Dict[str, List[Optional[int]]] = {m.name: [] for m in methods}
    for i in range(config.steps):
        shift = i % len(methods)  # rotate which goes first
        for m in methods[shift:] + methods[:shift]:
            elapsed, cpu, peak = harness.timed(m)
            times[m.name].append(elapsed)
            cpu_times[m.name].append(cpu)
            cuda_peaks[m.name].append(peak)
            say(f"step {i + 1}/{config.steps}: {m.name} {elapsed:.3f} s")
    probes: Dict[str, Optional[Dict[str, Any]]] = {m.name: None for m in methods}
    if config.memory_probe:
        for m in methods:
            say(f"memory probe: {m.name}")
            probes[m.name] = harness.probe(m)

    report: Dict[str, Any] = {
        "format": "auglocal-fx-bench",
        "version": 2,
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
        "methods": [m.name for m in methods],
        "labels": {m.name: m.label for m in methods},
    }
    for m in methods:
        entry = _method_report(times[m.name], cpu_times[m.name], cuda_peaks[m.name], probes[m.name],
                               state_account(m.lm, m.optimizers, with_aux=m.with_aux), batch_bytes, config.batch,
                               method_flops[m.name])
        if m.kind == "local" and m.lm is not lm:
            entry["params"] = {"aux": sum(p.numel() for p in m.lm.aux_parameters())}
        if m.kind == "checkpoint":
            ckpt = m.info["checkpointed_bp"]
            entry["checkpoint"] = {
                "segments": len(ckpt.ranges), "ranges": [list(r) for r in ckpt.ranges],
                # saved-activation peak the segmenting predicts (costs measured on the FLOP batch, scaled)
                "predicted_saved_peak": int(predicted_peak(ckpt.costs, ckpt.ranges) * config.batch / fb)
                if ckpt.costs else None,
            }
        report[m.name] = entry
    if "bp" in report:
        report["vs_bp"] = {m.name: _vs_bp(report, m.name) for m in methods if m.name != "bp"}
        if "auglocal" in report["vs_bp"]:
            report["ratios"] = report["vs_bp"]["auglocal"]
    return report


def time_convert(model: nn.Module, *, repeats: int = 1, **convert_kwargs) -> Tuple[LocalModel, List[float]]:
    """Convert ``model`` ``repeats`` times and return the last LocalModel and each wall time (seconds)."""
    from ..convert import convert

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
    from ..hub import create_model

    torch.manual_seed(config.seed)
    model = create_model(name, num_classes=num_classes)
    lm, convert_times = time_convert(model, layers=layers, aux_depth=aux_depth, pyramid=pyramid, input_size=input_size)
    del model
    report = run_benchmark(lm, config, progress=progress)
    report["model"] = report.get("model") or name
    report["convert_s"] = convert_times[0]
    return report
