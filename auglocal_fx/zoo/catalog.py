"""The zoo's catalog: which models are under test and which input sizes each one is tried at.

Every torchvision classification model, and for timm the smallest model (by parameter count, counted on the meta
device) of every model family; filters are shell globs on model and family names.

Example::

    from auglocal_fx.zoo import candidate_configs, select_models
    models = select_models("torchvision", ["resnet1*"])     # resnet101, resnet152, resnet18
    candidate_configs(models[-1])                           # [({}, (3, 64, 64)), ..., ({}, (3, 224, 224))]
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .._fsync import atomic_write_text
from .._versions import package_version

__all__ = [
    "SOURCES",
    "FAST_TORCHVISION",
    "ZooModel",
    "torchvision_models",
    "timm_families",
    "count_params_meta",
    "timm_param_counts",
    "timm_family_representatives",
    "select_models",
    "fast_subset",
    "candidate_configs",
]

SOURCES = ("torchvision", "timm")
_SMALL_SIZES = (64, 56, 96, 112, 128)  # 56 and 112 for patch-14 models

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


# ------------------------------------------------------------------------------------------------ model lists


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


# ------------------------------------------------------------------------------------------------ input sizes


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
