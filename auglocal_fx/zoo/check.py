"""One model through the zoo's steps, in this process: create, trace, convert, equivalence, local_step, save_load.

:func:`check_model` records which step failed, a one-line reason and the time of each step in a
:class:`ZooResult`; it never raises for a model's failure.

Example::

    from auglocal_fx.zoo import ZooModel, check_model
    result = check_model(ZooModel("torchvision", "resnet18"))
    print(result.status, result.input_size, result.num_units, result.conversions[0]["max_abs_diff"])
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .._malloc import release_free_memory, set_mmap_threshold
from .catalog import ZooModel, candidate_configs

__all__ = ["STEPS", "ZooResult", "check_model", "one_line"]

STEPS = ("create", "trace", "convert", "equivalence", "local_step", "save_load")
_BATCH = 2  # > 1: BatchNorm in training mode needs more than one value per channel
_REASON_CHARS = 300
_EQUIV_RTOL = 1e-5

# save/load holds the saved tensors and a rebuilt LocalModel next to each other: the round trip is checked on
# the one-layer-per-unit conversion unless that LocalModel is larger than this, then on the 4-layer one.
_ROUND_TRIP_PARAMS = 400_000_000


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ZooResult:
    """The outcome of one model: ``status`` is ``"pass"`` or ``"fail"``; ``failed_step`` and ``reason`` (one line)
    say what went wrong."""

    source: str
    name: str
    family: Optional[str] = None
    status: str = "fail"
    failed_step: Optional[str] = None
    reason: Optional[str] = None
    seconds: float = 0.0
    input_size: Optional[List[int]] = None
    create_kwargs: Dict[str, Any] = field(default_factory=dict)
    params: Optional[int] = None
    num_units: Optional[int] = None
    num_cuts: Optional[int] = None
    max_layers: Optional[int] = None
    auto_leaves: List[str] = field(default_factory=list)
    conversions: List[Dict[str, Any]] = field(default_factory=list)  # one per K tested
    step_seconds: Dict[str, float] = field(default_factory=dict)
    peak_memory_gib: Optional[float] = None  # the worker's peak resident memory (isolated runs, sampled each second)
    traceback: Optional[str] = None  # the last frames of a failure, for debugging (kept out of the markdown)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ZooResult":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class _StepFailed(Exception):
    def __init__(self, step: str, reason: str, tb: Optional[str] = None):
        super().__init__(reason)
        self.step, self.reason, self.tb = step, reason, tb


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most a few hundred characters."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return msg if len(msg) <= _REASON_CHARS else msg[: _REASON_CHARS - 3] + "..."


def _short_traceback(exc: BaseException, frames: int = 6) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines)
    tail = text.strip().splitlines()
    return "\n".join(tail[-2 * frames - 1:])


class _Recorder:
    """Times steps into a ZooResult and turns the first exception into a failure of the current step."""

    def __init__(self, result: ZooResult, progress: Optional[Callable[[str], None]] = None,
                 snapshot: Optional[Callable[[ZooResult], None]] = None):
        self.result = result
        self.progress = progress
        self.snapshot = snapshot

    @contextlib.contextmanager
    def step(self, name: str):
        if self.snapshot is not None:
            self.snapshot(self.result)  # what is known so far, in case this step never returns
        if self.progress is not None:
            self.progress(name)
        start = time.perf_counter()
        try:
            yield
        except _StepFailed:
            raise
        except Exception as exc:
            raise _StepFailed(name, one_line(exc), _short_traceback(exc)) from exc
        finally:
            self.result.step_seconds[name] = round(self.result.step_seconds.get(name, 0.0) + time.perf_counter() - start, 3)


# -------------------------------------------------------------------------------------------------- one model


def _create(model: ZooModel, kwargs: Mapping[str, Any], seed: int):
    import torch

    from ..hub import create_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(model.qualified_name, pretrained=False, **dict(kwargs))


def _tune_malloc() -> None:
    """In a worker: serve every allocation of 1 MiB or more with mmap, so freed weights go back to the system.

    glibc otherwise raises its mmap threshold after the first large free, and the copies a conversion makes and
    drops (the trace's model copy, the first LocalModel) stay in the heap: twice the memory on large models.
    """
    set_mmap_threshold(1 << 20)


def _release_memory() -> None:
    gc.collect()
    release_free_memory()


def _example(size: Sequence[int], seed: int, batch: int = _BATCH):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *size), generator=generator)


def _choose_config(model: ZooModel, input_size: Optional[Sequence[int]], seed: int):
    """Build the model with the first candidate config whose eval forward runs; returns (model, kwargs, size, x)."""
    import torch

    errors = []
    for kwargs, size in candidate_configs(model, input_size):
        try:
            net = _create(model, kwargs, seed)
        except Exception as exc:
            errors.append(f"{kwargs or 'defaults'} -> {one_line(exc)}")
            continue
        x = _example(size, seed)
        try:
            net.eval()
            with torch.no_grad():
                out = net(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"eval forward returns {type(out).__name__}, not a logits tensor")
        except Exception as exc:
            errors.append(f"{tuple(size)}{' ' + json.dumps(kwargs) if kwargs else ''} -> {one_line(exc)}")
            del net
            continue
        return net, dict(kwargs), tuple(size), x
    raise RuntimeError("no input size works: " + "; ".join(errors[-2:]))


def _estimate_params(inspection, layers: int, model_params: int) -> Optional[int]:
    """Parameters of the LocalModel ``convert(layers=layers)`` builds (backbone + aux nets), from the units alone.

    Exact for one layer per unit, up to shape adapters; for fewer layers the aux nets of grouped units are
    estimated the same way from each group's last unit. None when the schedule cannot be computed.
    """
    try:
        from .. import depth_schedule, select_aux_units

        units = inspection.units
        n = len(units)
        if layers < 2 or n < 2:
            return model_params
        if layers > n:
            return None
        ends = [round((i + 1) * n / layers) - 1 for i in range(layers - 1)]
        aux = 0
        for end, depth in zip(ends, depth_schedule(layers, 2, 0.5)):
            aux += sum(units[u]["params"] for u in select_aux_units(end, n, depth)) + inspection.head["params"]
        return int(model_params + aux)
    except Exception:
        return None


def _max_abs_diff(a, b) -> float:
    import torch

    if a.shape != b.shape:
        raise AssertionError(f"output shape {tuple(b.shape)} differs from the original's {tuple(a.shape)}")
    if torch.equal(a, b):
        return 0.0
    diff = (a.double() - b.double()).abs()
    return float(diff.nan_to_num(nan=math.inf).max()) if diff.numel() else 0.0


def _run_conversion(
    rec: _Recorder, holder: List[Any], ref, x, layers: int, size, workdir: Path, seed: int, *, save_load: bool,
    last: bool = False,
) -> None:
    """Steps 2-5 for one K (step 5 when ``save_load``); the figures go to a new entry of ``conversions``.

    ``holder`` holds the original model; for the ``last`` conversion it is emptied once converted, so that the
    original's memory is free for the rest of the steps.
    """
    import torch

    import auglocal_fx

    info: Dict[str, Any] = {"layers": layers, "save_load": bool(save_load)}
    rec.result.conversions.append(info)  # appended first: a failure keeps what was measured
    with rec.step("convert"):
        lm = auglocal_fx.convert(holder[0], layers=layers, input_size=size)
        if last:
            holder.clear()
            gc.collect()
        info["params"] = int(sum(p.numel() for p in lm.parameters()))
        info["aux_params"] = int(sum(p.numel() for p in lm.aux.parameters()))
    with rec.step("equivalence"):
        lm.eval()
        with torch.no_grad():
            out = lm(x)
        diff = _max_abs_diff(ref, out)
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        tol = _EQUIV_RTOL * max(1.0, scale)
        info.update(max_abs_diff=diff, tolerance=tol, exact=diff == 0.0)
        if not diff <= tol:
            raise AssertionError(f"LocalModel output differs from the original's by {diff:.3g} (tolerance {tol:.3g})")
    with rec.step("local_step"):
        lm.train()
        for p in lm.parameters():
            p.grad = None
        generator = torch.Generator().manual_seed(seed + 1)
        target = torch.randint(0, ref.shape[1], (x.shape[0],), generator=generator)
        seen: set = set()

        def collect(k: int) -> None:  # record and free each layer's gradients as soon as they exist
            params = list(lm.layers[k].parameters()) + (list(lm.aux[k].parameters()) if k < len(lm.aux) else [])
            for p in params:
                if p.grad is not None:
                    seen.add(id(p))
                    p.grad = None

        losses = lm.local_step(x, target, after_backward=collect)
        if len(losses) != layers:
            raise AssertionError(f"local_step returned {len(losses)} losses for {layers} layers")
        missing = []
        for prefix, module in (("layers", lm.layers), ("aux", lm.aux)):
            for pname, p in module.named_parameters():
                if p.requires_grad and id(p) not in seen and p.grad is None:
                    missing.append(f"{prefix}.{pname}")
        info["nonfinite_losses"] = int(sum(1 for v in losses if not bool(torch.isfinite(v))))
        if missing:
            shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            raise AssertionError(f"{len(missing)} parameters got no gradient from local_step: {shown}")
    if not save_load:
        return
    from .. import io as artifact_io

    with rec.step("save_load"):
        lm.eval()
        with torch.no_grad():
            before = [t.clone() for t in lm.layerwise_logits(x)]
        keys = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
        target_dir = workdir / f"k{layers}"
        artifact_io.save(lm, target_dir, overwrite=True)
        del lm
        _release_memory()
        lm2 = artifact_io.load(target_dir)
        lm2.eval()
        keys2 = {k: tuple(v.shape) for k, v in lm2.state_dict().items()}
        if keys2 != keys:
            changed = sorted(set(keys) ^ set(keys2)) or [k for k in keys if keys[k] != keys2[k]]
            raise AssertionError(f"the loaded model's state_dict differs: {', '.join(changed[:3])}")
        with torch.no_grad():
            after = lm2.layerwise_logits(x)
        for k, (a, b) in enumerate(zip(before, after)):
            if not torch.equal(a, b):
                raise AssertionError(f"layer {k} logits differ after save/load by {_max_abs_diff(a, b):.3g}")
        shutil.rmtree(target_dir, ignore_errors=True)
        del lm2


def check_model(
    model: ZooModel,
    *,
    input_size: Optional[Sequence[int]] = None,
    layers: Sequence[Optional[int]] = (None, 4),
    seed: int = 0,
    workdir: Optional[Path] = None,
    progress: Optional[Callable[[str], None]] = None,
    threads: Optional[int] = 1,
    memory_budget: Optional[float] = None,
    snapshot: Optional[Callable[[ZooResult], None]] = None,
) -> ZooResult:
    """Run the zoo's steps on one model in this process. ``layers``: None means one layer per unit.

    ``threads``: torch's intra-op threads while the model runs (restored after). One is the default: the models
    are small, and on a shared or busy machine more threads mostly spin.
    ``memory_budget``: bytes; a conversion whose weights alone (estimated from the units before converting)
    would exceed it fails the ``convert`` step with that figure instead of being attempted.
    """
    import torch

    if threads:
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation and init notices of the libraries: noise here
                return check_model(model, input_size=input_size, layers=layers, seed=seed, workdir=workdir,
                                   progress=progress, threads=None, memory_budget=memory_budget,
                                   snapshot=snapshot)
        finally:
            torch.set_num_threads(saved_threads)

    import auglocal_fx

    result = ZooResult(source=model.source, name=model.name, family=model.family, params=model.params)
    rec = _Recorder(result, progress, snapshot)
    start = time.perf_counter()
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="auglocal-zoo-")) if own_dir else Path(workdir)
    try:
        with rec.step("create"):
            net, kwargs, size, x = _choose_config(model, input_size, seed)
            result.create_kwargs, result.input_size = kwargs, list(size)
            result.params = int(sum(p.numel() for p in net.parameters()))
            net.eval()
            with torch.no_grad():
                ref = net(x)
        with rec.step("trace"):
            inspection = auglocal_fx.inspect_model(net, input_size=size)
            result.num_units = len(inspection.units)
            result.num_cuts = len(inspection.valid_cuts)
            result.max_layers = int(inspection.max_layers)
            result.auto_leaves = list(inspection.leaf_modules_added)
            if result.num_units < 2:
                raise AssertionError(
                    f"only {result.num_units} unit found before the head ({result.num_cuts} valid cut points): "
                    "nothing to train locally"
                )
        wanted: List[int] = []
        for k in layers:
            k = result.num_units if k is None else min(int(k), result.max_layers)
            if k not in wanted:
                wanted.append(k)
        # The biggest LocalModel (one layer per unit: its aux nets copy later units) runs last, after the
        # original model is dropped; save/load doubles memory, so a LocalModel above _ROUND_TRIP_PARAMS is not
        # the one round-tripped.
        estimates = {k: _estimate_params(inspection, k, result.params) for k in wanted}
        order = sorted(wanted, key=lambda k: estimates[k] or 0)
        round_trip = wanted[0] if (estimates[wanted[0]] or 0) <= _ROUND_TRIP_PARAMS else order[0]
        del inspection
        holder = [net]
        del net
        _release_memory()
        over_budget = None
        for i, k in enumerate(order):
            need = 4 * ((estimates[k] or 0) + result.params)  # while converting: the original and the LocalModel
            if memory_budget and need > memory_budget:
                over_budget = (k, need)
                continue
            _run_conversion(rec, holder, ref, x, k, size, workdir, seed, save_load=k == round_trip,
                            last=i == len(order) - 1)
            _release_memory()
        result.conversions.sort(key=lambda c: wanted.index(c["layers"]))
        if over_budget is not None:
            k, need = over_budget
            result.conversions.append({"layers": k, "estimated_params": estimates[k]})
            result.conversions.sort(key=lambda c: wanted.index(c["layers"]))
            done = ", ".join(f"layers={c['layers']}" for c in result.conversions if "max_abs_diff" in c)
            raise _StepFailed(
                "convert",
                f"layers={k} needs about {need / 2**30:.1f} GiB for its weights alone (a LocalModel of "
                f"{estimates[k] / 1e9:.2f}G parameters: the aux nets copy later units), over the memory budget of "
                f"{memory_budget / 2**30:.0f} GiB" + (f"; {done} passed every step" if done else ""),
            )
        result.status = "pass"
    except _StepFailed as failure:
        result.status, result.failed_step, result.reason, result.traceback = "fail", failure.step, failure.reason, failure.tb
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        result.seconds = round(time.perf_counter() - start, 3)
    return result
