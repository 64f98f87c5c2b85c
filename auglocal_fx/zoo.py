"""The model zoo check: convert every torchvision classifier and every timm model family, and prove it works.

For each model, with random weights (``pretrained=False`` always: nothing is downloaded) and a small input where
the model allows one, the zoo runs five steps and records which one failed, a one-line reason and the time:

1. ``trace``: :func:`auglocal_fx.inspect_model` finds the units, the valid cut points and the largest K;
2. ``convert``: :func:`auglocal_fx.convert` with one local layer per unit, and again with ``layers=4``;
3. ``equivalence``: in eval mode, ``LocalModel.forward`` returns the original model's output (``torch.equal``, or a
   max abs difference within ``1e-5 * max(1, max|reference|)``; the figure is reported);
4. ``local_step``: one :meth:`~auglocal_fx.LocalModel.local_step` in training mode gives every parameter of
   ``lm.layers`` and ``lm.aux`` that requires grad a gradient;
5. ``save_load``: :func:`auglocal_fx.io.save` then :func:`auglocal_fx.io.load` give a model whose layer-wise logits
   (every layer and every aux net) are bit-identical.

Steps 3 and 4 run for both conversions, step 5 for the one-layer-per-unit conversion (the most cuts to
re-apply) unless its LocalModel holds more than 400M parameters, then for the 4-layer one. A ``create`` step
comes first: it builds the model and picks its input size (the first of a few small candidates, then the
model's native size, whose eval forward runs).

Models under test: every torchvision classification model (``torchvision.models.list_models(module=
torchvision.models)``), and for timm every model family (each ``timm.models.<module>`` that registers models)
represented by its smallest architecture by parameter count, counted on the meta device so nothing is allocated.
Filters (shell globs) select from model names and timm family names; a filter matching a model name that is not a
family's representative adds that model.

By default every model runs in a forked worker process, so that a crash, a hang (``timeout``) or a model that
exhausts memory fails that model only; the JSON report is rewritten after every model, so an interrupted run loses
nothing and ``resume=True`` picks up where it stopped.

Example::

    from auglocal_fx import zoo
    models = zoo.select_models("timm", ["resnet", "vit_*"])
    report = zoo.run_zoo(models, json_path="zoo.json")
    zoo.write_markdown(report, "zoo.md")

    zoo.check_model(zoo.ZooModel("torchvision", "resnet18"))   # one model, in this process -> ZooResult
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ._fsync import atomic_write_text
from ._malloc import release_free_memory, set_mmap_threshold
from ._versions import package_version

__all__ = [
    "SOURCES",
    "STEPS",
    "ZooModel",
    "ZooResult",
    "torchvision_models",
    "timm_families",
    "timm_param_counts",
    "timm_family_representatives",
    "select_models",
    "fast_subset",
    "candidate_configs",
    "check_model",
    "run_zoo",
    "summarize",
    "write_json",
    "read_json",
    "write_markdown",
    "render_markdown",
    "KNOWN_LIMITATIONS",
]

SOURCES = ("torchvision", "timm")
STEPS = ("create", "trace", "convert", "equivalence", "local_step", "save_load")
REPORT_FORMAT = "auglocal-fx-zoo"
REPORT_VERSION = 1

_BATCH = 2  # > 1: BatchNorm in training mode needs more than one value per channel
_SMALL_SIZES = (64, 56, 96, 112, 128)  # 56 and 112 for patch-14 models
_REASON_CHARS = 300
_EQUIV_RTOL = 1e-5
# save/load holds the saved tensors and a rebuilt LocalModel next to each other: the round trip is checked on
# the one-layer-per-unit conversion unless that LocalModel is larger than this, then on the 4-layer one.
_ROUND_TRIP_PARAMS = 400_000_000

# Failures that remain after fixing the converter, with why and what to do about them. Keys are model names or
# timm family names ("timm:<family>"); render_markdown() prints the entry under each failing model.
KNOWN_LIMITATIONS: Dict[str, str] = {
    "torchvision:regnet_y_128gf": (
        "**Memory, not a converter bug.** With one local layer per unit (28 units) the aux nets copy the later, "
        "widest units of this 645M-parameter model: the LocalModel holds about 5.0G parameters (7.7x the model), "
        "about 21 GiB in float32 before a single activation, over the harness's per-model budget on this 23 GiB "
        "machine. `layers=4` passes every step, save/load included. Workaround: fewer local layers (`layers=4..8`), "
        "`aux_depth=1`, or a machine with 32+ GiB."
    ),
    "timm:crossvit": (
        "**Limitation: two token streams.** CrossViT embeds the image twice (small and large patches) and runs both "
        "streams side by side through every block until the two class tokens meet in the head, so no point of the "
        "graph has exactly one tensor crossing it. auglocal-fx cuts where one tensor crosses; a model that keeps "
        "parallel streams cannot be split without changing it (concatenating the streams into one tensor between "
        "blocks would make it cuttable). No workaround with leaf modules or explicit cuts."
    ),
    "timm:tnt": (
        "**Limitation: two token streams.** Transformer-in-Transformer blocks take and return two tensors (the inner "
        "pixel embeddings and the outer patch embeddings), so between blocks two tensors are always live: the only "
        "valid cuts are in the stem and after the last block, one unit in all. No workaround without changing the "
        "model."
    ),
    "timm:efficientvim": (
        "**Limitation: multi-stage head.** EfficientViM's classifier reads the hidden state of every stage (one head "
        "per stage, weighted and summed), so from the end of the first stage on, several tensors stay live until "
        "the head and the graph can only be cut inside the stem and stage 0. No workaround without changing the "
        "model (a single-stage head, `heads` on the last stage only, makes it cuttable)."
    ),
    "timm:gemma4_vit": (
        "**Limitation of torch.fx: control flow on tensor metadata.** `Gemma4VitEncoder.forward` accepts raw "
        "images, pre-patchified NaFlex tensors and dicts, and branches on `x.ndim` and on padding masks "
        "(`if padding_positions.any()`), which symbolic tracing cannot follow; auglocal-fx makes the innermost "
        "failing module a leaf, here the whole encoder, leaving one unit. Workaround, verified on "
        "`gemma4_vit_167m`: [docs/examples/gemma4_vit.py](examples/gemma4_vit.py) wraps the model in a module that "
        "runs the same submodules for dense images only; it converts with 18 units, its output equals the "
        "model's within 1e-6, and a local_step gives every parameter a gradient "
        "(`pytest -m slow tests/test_zoo.py -k gemma4`)."
    ),
}

# Models that pass with few units (little to train locally), and why: rendered under "Few units" in docs/zoo.md.
FEW_UNITS_NOTES: Dict[str, str] = {
    "timm:nasnet": "NASNet cells read the outputs of the two previous cells, so two tensors are live between cells: "
                   "the only valid cuts are in the stem and before the head.",
    "timm:pnasnet": "PNASNet cells read the outputs of the two previous cells, so two tensors are live between cells: "
                    "the only valid cuts are in the stem and before the head.",
}
_FEW_UNITS = 3

# The fast subset run by the default test suite: timm's tiny test_* models and small torchvision models.
FAST_TORCHVISION = (
    "resnet18",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "densenet121",
    "googlenet",
    "efficientnet_b0",
    "regnet_x_400mf",
    "mobilenet_v2",
)


# ----------------------------------------------------------------------------------------------- model lists


@dataclass(frozen=True)
class ZooModel:
    """One model under test: its library (``"torchvision"`` or ``"timm"``), name, and timm family."""

    source: str
    name: str
    family: Optional[str] = None
    params: Optional[int] = None  # parameter count when known (timm representatives)

    @property
    def qualified_name(self) -> str:
        return f"{'tv' if self.source == 'torchvision' else 'timm'}:{self.name}"


def torchvision_models() -> List[ZooModel]:
    """Every torchvision classification model (the models of ``torchvision.models`` itself)."""
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    return [ZooModel("torchvision", n, family=_torchvision_family(n)) for n in sorted(names)]


def _torchvision_family(name: str) -> str:
    import torchvision.models

    builder = torchvision.models.get_model_builder(name)
    return builder.__module__.rsplit(".", 1)[-1]


def timm_families() -> Dict[str, List[str]]:
    """``{family: [model names]}``: each module of ``timm.models`` that registers models, with its models."""
    import timm
    from timm.models import _registry

    families: Dict[str, List[str]] = {}
    module_of = getattr(_registry, "_model_to_module", {})
    for name in timm.list_models():
        family = module_of.get(name)
        if family is None:  # a timm without the private mapping: the entrypoint's module says it too
            family = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        families.setdefault(family, []).append(name)
    return families


def count_params_meta(name: str) -> Optional[int]:
    """Parameter count of timm model ``name``, built on the meta device (no memory, no init); None if it can't be."""
    import timm
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def _name_size_key(name: str) -> Tuple[int, int, str]:
    """Fallback order when a model cannot be built on the meta device: tiny names first, then shorter ones."""
    order = ("test", "atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "s", "mini", "lite", "b0", "base")
    parts = re.split(r"[_.]", name)
    rank = min((order.index(p) for p in parts if p in order), default=len(order))
    return (rank, len(name), name)


def _cache_file() -> Optional[Path]:
    """Where parameter counts are cached, per timm version (building 1,400 models on meta takes minutes)."""
    if os.environ.get("AUGLOCAL_ZOO_CACHE", "1").strip() in ("0", "", "false", "no"):
        return None
    version = package_version("timm")
    if version is None:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "auglocal_fx" / f"zoo-timm-{version}-params.json"


def timm_param_counts(names: Sequence[str]) -> Dict[str, Optional[int]]:
    """``{name: parameter count or None}``, counted on the meta device and cached per timm version."""
    path = _cache_file()
    cache: Dict[str, Optional[int]] = {}
    if path is not None and path.is_file():
        try:
            cache = {k: v for k, v in json.loads(path.read_text()).items() if v is None or isinstance(v, int)}
        except (OSError, ValueError, AttributeError):
            cache = {}
    missing = [n for n in names if n not in cache]
    for n in missing:
        cache[n] = count_params_meta(n)
    if missing and path is not None:
        try:
            atomic_write_text(path, json.dumps(cache, indent=0, sort_keys=True))
        except OSError:
            pass
    return {n: cache[n] for n in names}


def timm_family_representatives(families: Optional[Iterable[str]] = None) -> List[ZooModel]:
    """The smallest model (by parameter count, counted on the meta device) of each timm family.

    Ties go to the shorter, then alphabetically first name. A family none of whose models builds on the meta
    device falls back to a name heuristic (``test``/``tiny``/``small``... first). The counts are cached in
    ``~/.cache/auglocal_fx`` per timm version (``AUGLOCAL_ZOO_CACHE=0`` turns the cache off).
    """
    all_families = timm_families()
    wanted = sorted(all_families) if families is None else [f for f in sorted(set(families)) if f in all_families]
    counts = timm_param_counts([n for f in wanted for n in all_families[f]])
    chosen: List[ZooModel] = []
    for family in wanted:
        counted = [(counts[n], n) for n in all_families[family]]
        known = [(c, len(n), n) for c, n in counted if c is not None]
        if known:
            params, _, name = min(known)
        else:
            name, params = min(all_families[family], key=_name_size_key), None
        chosen.append(ZooModel("timm", name, family=family, params=params))
    return chosen


def _matches(patterns: Sequence[str], *names: Optional[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def select_models(source: str = "all", filters: Optional[Sequence[str]] = None) -> List[ZooModel]:
    """The models to test: every torchvision classifier and the smallest model of every timm family.

    ``filters`` (shell globs) keep the models whose name or timm family matches; a pattern that matches other
    timm or torchvision model names adds them too (``"resnet50"`` tests timm's resnet50 besides the family's
    smallest model).
    """
    if source not in ("all",) + SOURCES:
        raise ValueError(f"source must be one of all, torchvision, timm; got {source!r}")
    filters = [f for f in (filters or []) if f]
    models: List[ZooModel] = []
    if source in ("all", "torchvision"):
        tv = torchvision_models()
        models += [m for m in tv if not filters or _matches(filters, m.name)]
    if source in ("all", "timm"):
        import timm

        families = timm_families()
        if filters:
            family_of = {n: f for f, names in families.items() for n in names}
            wanted = [f for f in families if _matches(filters, f)]
            reps = timm_family_representatives(wanted)
            named = sorted(n for n in timm.list_models() if _matches(filters, n))
            have = {m.name for m in reps}
            reps += [ZooModel("timm", n, family=family_of.get(n)) for n in named if n not in have]
            models += reps
        else:
            models += timm_family_representatives()
    return models


def fast_subset() -> List[ZooModel]:
    """timm's tiny ``test_*`` models and about ten small torchvision models (the default test run)."""
    import timm

    families = {n: f for f, names in timm_families().items() for n in names}
    tv = [ZooModel("torchvision", n, family=_torchvision_family(n)) for n in FAST_TORCHVISION]
    tm = [ZooModel("timm", n, family=families.get(n)) for n in timm.list_models("test_*")]
    return tv + tm


# ------------------------------------------------------------------------------------------- input sizes


def candidate_configs(model: ZooModel, input_size: Optional[Sequence[int]] = None) -> List[Tuple[Dict[str, Any], Tuple[int, int, int]]]:
    """``[(create kwargs, (C, H, W)), ...]`` to try in order: small inputs first, the model's native size last.

    With ``input_size`` given, only that size is tried (ViT-like models get it as their image size too).
    """
    configs: List[Tuple[Dict[str, Any], Tuple[int, int, int]]] = []
    if model.source == "torchvision":
        name = model.name
        if name.startswith("vit_"):
            patch = int(name.rsplit("_", 1)[-1])
            sizes = [input_size] if input_size else [(3, patch * 4, patch * 4), (3, 224, 224)]
            configs = [({"image_size": int(s[1])} if s[1] != 224 else {}, tuple(s)) for s in sizes]
        elif input_size:
            configs = [({}, tuple(input_size))]
        elif name.startswith("maxvit"):
            configs = [({}, (3, 224, 224))]  # partitions of 7 at every stage: 224 is the smallest size
        else:
            configs = [({}, (3, s, s)) for s in _SMALL_SIZES] + [({}, (3, 224, 224))]
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(model.name)
        native = tuple(int(v) for v in (getattr(cfg, "input_size", None) or (3, 224, 224)))
        fixed = bool(getattr(cfg, "fixed_input_size", False))
        # min_input_size is what pretrained weights need; random weights run smaller (the forward check decides).
        sizes = [s for s in _SMALL_SIZES if s < native[1]]
        # Feature extractors (DINOv3, the encoders of multimodal models) default to num_classes=0: no head.
        base = {"num_classes": 1000} if getattr(cfg, "num_classes", 1000) == 0 else {}
        if input_size:
            size = tuple(int(v) for v in input_size)
            configs = [(dict(base), size), ({**base, "img_size": size[1]}, size)]
        else:
            for s in sizes:
                plain, resized = (dict(base), (native[0], s, s)), ({**base, "img_size": s}, (native[0], s, s))
                configs += [resized, plain] if fixed else [plain, resized]
            configs.append((dict(base), native))
    out, seen = [], set()
    for kwargs, size in configs:
        key = (json.dumps(kwargs, sort_keys=True), tuple(size))
        if key not in seen:
            seen.add(key)
            out.append((kwargs, tuple(int(v) for v in size)))
    return out


# ------------------------------------------------------------------------------------------------ results


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


# ---------------------------------------------------------------------------------------------- one model


def _create(model: ZooModel, kwargs: Mapping[str, Any], seed: int):
    import torch

    from .hub import create_model

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
        from . import depth_schedule, select_aux_units

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
    from . import io as artifact_io

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


# ------------------------------------------------------------------------------------------- the whole zoo


def _versions() -> Dict[str, Optional[str]]:
    return {
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "torchvision": package_version("torchvision"),
        "timm": package_version("timm"),
        "auglocal_fx": package_version("auglocal-fx", "auglocal_fx"),
    }


def _machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            info["memory_gib"] = round(kb / 2**20, 1)
    except OSError:
        pass
    return info


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def summarize(results: Sequence[ZooResult]) -> Dict[str, Dict[str, Any]]:
    """Pass counts and rates per source (and over all models)."""
    summary: Dict[str, Dict[str, Any]] = {}
    for source in SOURCES + ("all",):
        rows = [r for r in results if source == "all" or r.source == source]
        if not rows:
            continue
        passed = sum(r.passed for r in rows)
        summary[source] = {
            "total": len(rows),
            "passed": passed,
            "failed": sum(r.status == "fail" for r in rows),
            "pass_rate": round(passed / len(rows), 4),
            "seconds": round(sum(r.seconds for r in rows), 1),
        }
    return summary


def write_json(report: Mapping[str, Any], path: Path) -> None:
    """Write the report atomically (a crash mid-write keeps the previous file)."""
    atomic_write_text(Path(path), json.dumps(report, indent=1, allow_nan=False, default=str) + "\n")


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _make_report(results: Sequence[ZooResult], meta: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        **meta,
        "summary": summarize(results),
        "results": [_clean(r.to_dict()) for r in results],
    }


def _clean(obj: Any) -> Any:
    """Make floats JSON-safe (inf/nan become strings)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (0 where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _run_forked(
    model: ZooModel,
    kwargs: Dict[str, Any],
    timeout: float,
    on_step: Callable[[str], None],
    max_memory: Optional[float] = None,
) -> ZooResult:
    """``check_model`` in a forked child; a crash, a kill, a timeout or using more than ``max_memory`` bytes fails
    the model at its current step."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(model, kwargs, child_conn), daemon=True)
    start = time.perf_counter()
    proc.start()
    child_conn.close()
    step, result, peak, over, timed_out, last_snapshot = "create", None, 0, False, False, None
    try:
        while True:
            remaining = timeout - (time.perf_counter() - start)
            if remaining <= 0:
                timed_out = True
                break
            peak = max(peak, _rss_bytes(proc.pid))
            if max_memory and peak > max_memory:
                over = True
                break
            if parent_conn.poll(min(remaining, 0.5)):
                try:
                    kind, payload = parent_conn.recv()
                except EOFError:
                    break
                if kind == "step":
                    step = payload
                    on_step(step)
                elif kind == "snapshot":
                    last_snapshot = payload
                else:
                    result = ZooResult.from_dict(payload)
                    break
            elif not proc.is_alive() and not parent_conn.poll(0):
                break
    finally:
        parent_conn.close()
    seconds = round(time.perf_counter() - start, 3)
    if result is not None:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        result.peak_memory_gib = round(peak / 2**30, 2) if peak else None
        return result
    if timed_out or over:
        proc.kill()
    proc.join(30)  # the pipe closed: the worker is exiting (or was killed)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if over:
        reason = f"used more than {max_memory / 2**30:.0f} GiB of memory (the per-model limit) in step {step}"
    elif timed_out:
        reason = f"timed out after {timeout:.0f} s (per-model limit) in step {step}"
    else:
        code = proc.exitcode
        what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
        reason = f"the worker process died with {what}{hint} in step {step}"
    failure = ZooResult.from_dict(last_snapshot) if last_snapshot else ZooResult(
        source=model.source, name=model.name, family=model.family, params=model.params)
    failure.status, failure.failed_step, failure.reason, failure.seconds = "fail", step, reason, seconds
    failure.peak_memory_gib = round(peak / 2**30, 2) if peak else None
    return failure


def _child_main(model: ZooModel, kwargs: Dict[str, Any], conn) -> None:
    try:  # if memory runs out, the kernel should pick this worker, not a neighbour's process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    _tune_malloc()
    try:
        result = check_model(model, progress=lambda s: conn.send(("step", s)),
                             snapshot=lambda r: conn.send(("snapshot", _clean(r.to_dict()))), **kwargs)
        conn.send(("result", _clean(result.to_dict())))
    except BaseException as exc:  # anything the recorder did not catch: still report it
        failure = ZooResult(source=model.source, name=model.name, family=model.family, status="fail",
                            failed_step="create", reason=one_line(exc), traceback=_short_traceback(exc))
        try:
            conn.send(("result", failure.to_dict()))
        except Exception:
            pass
    finally:
        conn.close()
        os._exit(0)  # skip atexit handlers and finalizers inherited from the parent


def run_zoo(
    models: Sequence[ZooModel],
    *,
    json_path: Optional[Path] = None,
    input_size: Optional[Sequence[int]] = None,
    isolate: bool = True,
    timeout: float = 900.0,
    resume: bool = False,
    retry_failed: bool = False,
    seed: int = 0,
    threads: Optional[int] = 1,
    max_memory_gib: Optional[float] = None,
    memory_budget_gib: Optional[float] = None,
    command: Optional[str] = None,
    on_result: Optional[Callable[[ZooResult, int, int], None]] = None,
    on_step: Optional[Callable[[ZooModel, str], None]] = None,
) -> Dict[str, Any]:
    """Check every model; write the JSON report after each one (atomically) when ``json_path`` is given.

    Args:
        isolate: run each model in a forked child process (a crash, an out-of-memory kill or a hang then fails
            that model only; ``timeout`` and ``max_memory_gib`` are enforced). Without it, models run in this
            process, one after another.
        resume: keep the results already in ``json_path`` for models that are asked for again, and skip them.
        retry_failed: with ``resume``, check the models that failed in ``json_path`` again.
        max_memory_gib: kill a worker whose resident memory exceeds this (isolated runs).
        memory_budget_gib: a conversion whose weights alone would exceed this is not attempted (its ``convert``
            step fails with the estimate); defaults to 80% of ``max_memory_gib``.
        on_result: called with ``(result, index, total)`` after each model (progress output).
    Returns:
        The report dict (what the JSON holds).
    """
    json_path = Path(json_path) if json_path else None
    budget = memory_budget_gib if memory_budget_gib is not None else (max_memory_gib * 0.8 if max_memory_gib else None)
    previous: Dict[Tuple[str, str], ZooResult] = {}
    meta: Dict[str, Any] = {
        "command": command,
        "started": _now(),
        "finished": None,
        "complete": False,
        "wall_seconds": 0.0,
        "versions": _versions(),
        "machine": _machine(),
        "settings": {"batch": _BATCH, "seed": seed, "threads": threads, "max_memory_gib": max_memory_gib,
                     "memory_budget_gib": budget, "timeout_s": timeout, "isolate": isolate,
                     "input_size": list(input_size) if input_size else None, "layers": ["units", 4]},
    }
    elapsed_before = 0.0
    if resume and json_path is not None and json_path.is_file():
        old = read_json(json_path)
        previous = {(r["source"], r["name"]): ZooResult.from_dict(r) for r in old.get("results", [])
                    if not (retry_failed and r.get("status") == "fail")}
        meta["started"] = old.get("started", meta["started"])
        elapsed_before = float(old.get("wall_seconds") or 0.0)
    start = time.perf_counter()
    results: List[ZooResult] = []
    kwargs = {"input_size": input_size, "seed": seed, "threads": threads,
              "memory_budget": budget * 2**30 if budget else None}
    total = len(models)
    for index, model in enumerate(models):
        key = (model.source, model.name)
        if key in previous:
            result = previous[key]
        else:
            if isolate:
                result = _run_forked(model, kwargs, timeout, lambda s, m=model: on_step and on_step(m, s),
                                     max_memory=max_memory_gib * 2**30 if max_memory_gib else None)
            else:
                result = check_model(model, progress=lambda s, m=model: on_step and on_step(m, s), **kwargs)
            gc.collect()
        if result.family is None:
            result.family = model.family
        results.append(result)
        meta["wall_seconds"] = round(elapsed_before + time.perf_counter() - start, 1)
        if json_path is not None:
            write_json(_make_report(results, meta), json_path)
        if on_result is not None:
            on_result(result, index, total)
    meta.update(finished=_now(), complete=True, wall_seconds=round(elapsed_before + time.perf_counter() - start, 1))
    report = _make_report(results, meta)
    if json_path is not None:
        write_json(report, json_path)
    return report


# --------------------------------------------------------------------------------------------------- markdown


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{s:.1f} s"


def _fmt_count(n: Optional[int]) -> str:
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _limitation(result: Mapping[str, Any]) -> Optional[str]:
    for key in (result.get("name"), f"{result.get('source')}:{result.get('name')}", f"timm:{result.get('family')}"
                if result.get("source") == "timm" else None):
        if key and key in KNOWN_LIMITATIONS:
            return KNOWN_LIMITATIONS[key]
    return None


def _equiv_figure(result: Mapping[str, Any]) -> str:
    diffs = [c.get("max_abs_diff") for c in result.get("conversions") or [] if "max_abs_diff" in c]
    diffs = [d for d in diffs if isinstance(d, (int, float))]
    if not diffs:
        return ""
    worst = max(diffs)
    return "exact" if worst == 0 else f"{worst:.1e}"


def render_markdown(report: Mapping[str, Any], *, preamble: Optional[str] = None) -> str:
    """docs/zoo.md: pass rates per source at the top, then failures explained, then every model."""
    summary = report.get("summary", {})
    results = report.get("results", [])
    lines = ["# Model zoo: every torchvision classifier and every timm family", ""]
    lines += ["| source | models | passed | pass rate | failed | time |", "|---|---:|---:|---:|---:|---:|"]
    names = {"torchvision": "torchvision classification models", "timm": "timm model families", "all": "all"}
    for source in SOURCES + ("all",):
        s = summary.get(source)
        if s:
            lines.append(
                f"| {names[source]} | {s['total']} | {s['passed']} | **{100 * s['pass_rate']:.1f}%** | {s['failed']} "
                f"| {_fmt_seconds(s['seconds'])} |"
            )
    versions = report.get("versions", {})
    machine = report.get("machine", {})
    lines += [
        "",
        f"Generated by `{report.get('command') or 'auglocal zoo'}`"
        + ("" if report.get("complete") else " (**incomplete run**)"),
        f"in {_fmt_seconds(report.get('wall_seconds') or 0)} wall time, finished {report.get('finished') or '-'}, "
        f"on {machine.get('cpus', '?')} CPU cores ({machine.get('cpu', 'unknown CPU')}, "
        f"{machine.get('memory_gib', '?')} GiB), CPU only; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "",
    ]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += _HOW_TO_READ
    failures = [r for r in results if r.get("status") != "pass"]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None: every model passed every step.")
    for r in failures:
        lines.append(f"### {r['source']}: `{r['name']}`" + (f" (family `{r['family']}`)" if r.get("family") else ""))
        lines.append("")
        lines.append(f"- **step `{r.get('failed_step')}`**: {r.get('reason')}")
        note = _limitation(r)
        lines.append(f"- {note}" if note else "- Not yet explained: a converter bug until shown otherwise.")
        lines.append("")
    few = [r for r in results if r.get("status") == "pass" and (r.get("num_units") or 0) <= _FEW_UNITS]
    if few:
        lines += ["", "## Passing with few units", "",
                  f"These pass every step but have {_FEW_UNITS} units or fewer before the head, so there is little to "
                  "train locally:", ""]
        for r in few:
            key = f"{r['source']}:{r.get('family') if r['source'] == 'timm' else r['name']}"
            note = FEW_UNITS_NOTES.get(key, "")
            lines.append(f"- {r['source']} `{r['name']}`: {r.get('num_units')} units. {note}".rstrip())
    for source in SOURCES:
        rows = [r for r in results if r.get("source") == source]
        if not rows:
            continue
        lines += ["", f"## {names[source].capitalize()}", ""]
        first = "family / model" if source == "timm" else "model"
        lines += [
            f"| {first} | result | params | input | units | cuts | max K | K tested | max abs diff | time | notes |",
            "|---|---|---:|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for r in rows:
            label = f"{r.get('family')} / `{r['name']}`" if source == "timm" else f"`{r['name']}`"
            result = "pass" if r.get("status") == "pass" else f"**fail** ({r.get('failed_step')})"
            size = "x".join(str(v) for v in r.get("input_size") or []) or "-"
            if r.get("create_kwargs"):
                size += " " + ", ".join(f"{k}={v}" for k, v in r["create_kwargs"].items())
            ks = ", ".join(str(c.get("layers")) + ("*" if c.get("save_load") else "") for c in r.get("conversions") or [])
            notes = []
            if r.get("auto_leaves"):
                notes.append(f"{len(r['auto_leaves'])} auto leaves")
            if r.get("peak_memory_gib"):
                notes.append(f"peak {r['peak_memory_gib']:.1f} GiB")
            lines.append(
                f"| {label} | {result} | {_fmt_count(r.get('params'))} | {_cell(size)} | {r.get('num_units') or ''} "
                f"| {r.get('num_cuts') if r.get('num_cuts') is not None else ''} | {r.get('max_layers') or ''} | {ks} "
                f"| {_equiv_figure(r)} | {r.get('seconds', 0):.1f} s | {_cell('; '.join(notes))} |"
            )
    return "\n".join(lines) + "\n"


_HOW_TO_READ = [
    "## What is checked",
    "",
    "Each model is built with random weights (`pretrained=False`, nothing is downloaded) and checked with a batch",
    "of 2 random images at the first input it accepts among 64, 56, 96, 112 and 128 pixels (timm's `img_size=` for",
    "fixed-size models, torchvision's `image_size=` for ViTs), else its native size. Feature extractors that timm",
    "builds without a classifier (`num_classes=0` by default: DINOv3, the encoders of multimodal models) get",
    "`num_classes=1000`. Steps:",
    "",
    "1. `trace`: `inspect_model` traces it and finds its units, valid cut points and the largest K; at least two",
    "   units are required (one unit means nothing is trained locally);",
    "2. `convert`: `convert(model, layers=<units>)` (one local layer per unit), and again with `layers=4`;",
    "3. `equivalence`: in eval mode `LocalModel.forward` equals the original output (`torch.equal`, or a max abs",
    "   difference within `1e-5 * max(1, max|reference|)`; the worst figure is in the tables);",
    "4. `local_step`: one `lm.local_step(x, y)` in training mode gives every parameter of `lm.layers` and `lm.aux`",
    "   a gradient;",
    "5. `save_load`: `auglocal_fx.io.save` then `load` give bit-identical logits from every layer and aux net, and",
    "   the same state_dict keys.",
    "",
    "Steps 3 and 4 run for both conversions; step 5 for the one-layer-per-unit conversion (the most cuts to",
    "re-apply), or for the 4-layer one when the former holds more than 400M parameters (a round trip holds the",
    "file's tensors and a rebuilt model at once). The round-tripped K is starred in the tables. A conversion whose",
    "weights alone, estimated from the units before converting, would not fit the per-model memory budget is not",
    "attempted: its `convert` step fails with the estimate. torchvision: every classification model of",
    "`torchvision.models`. timm: each module of `timm.models` that registers models (a *family*), represented by",
    "its smallest architecture by parameter count. Each model runs in its own forked process with a time and a",
    "memory limit, one torch thread, so one crash fails one model.",
    "",
    "Run it yourself:",
    "",
    "```",
    "auglocal zoo --json benchmarks/zoo_report.json --markdown docs/zoo.md --max-memory 14   # everything",
    "auglocal zoo --source timm --filter 'vit_*' --filter convnext       # globs on model and family names",
    "auglocal zoo --source torchvision --filter resnet50 --no-isolate    # one model, in this process",
    "pytest -m slow tests/test_zoo.py                                    # the full zoo as a test",
    "```",
    "",
    "The default `pytest` run checks a fast subset on every CI run: timm's tiny `test_*` models and ten small",
    "torchvision models (`auglocal_fx.zoo.fast_subset()`).",
]


def write_markdown(report: Mapping[str, Any], path: Path, *, preamble: Optional[str] = None) -> None:
    atomic_write_text(Path(path), render_markdown(report, preamble=preamble))
