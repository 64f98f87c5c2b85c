"""Build models by name: torchvision, timm, auglocal-fx's own registry, or a user's ``package.module:factory``.

The model records how it was built (``model._auglocal_source``), so that :func:`auglocal_fx.convert` can keep
it in the plan and :func:`auglocal_fx.load` can rebuild the same architecture from a saved artifact.

Name resolution, first match wins:

* ``tv:NAME`` / ``torchvision:NAME``, ``timm:NAME``, ``auglocal:NAME`` pick the library explicitly.
* ``package.module:factory`` calls ``factory(**kwargs)`` from an importable module (the user's own model).
* A plain ``NAME`` is looked up in torchvision's classification models first, then in auglocal-fx's registry
  (the paper's CIFAR ResNets), then in timm. So ``resnet50`` is torchvision's ResNet-50 (use ``timm:resnet50``
  for timm's), and a timm name with a pretrained tag (``resnet50.a1_in1k``) goes to timm.

Example::

    model = create_model("resnet50", num_classes=10)                 # torchvision
    model = create_model("timm:resnet50", pretrained_file="r50.safetensors")
    model = create_model("auglocal:resnet32")                        # CIFAR ResNet-32 of the paper
    model = create_model("my_project.nets:build_net", width=64)      # the user's own factory
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._pretrained import PretrainedWeightsError, fetching, locate_weights

__all__ = [
    "create_model", "resolve_model_name", "list_model_names", "load_pretrained_file", "SOURCE_ATTR",
    "PretrainedWeightsError",
]

# Attribute set on every model create_model builds; convert() copies it into plan.source.
SOURCE_ATTR = "_auglocal_source"

_PREFIXES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm", "auglocal": "auglocal"}
_CANONICAL_PREFIX = {"torchvision": "tv", "timm": "timm", "auglocal": "auglocal"}
# Arguments that only say where weights come from: the artifact carries the weights, so a rebuild must not
# download or read them again.
_WEIGHT_KWARGS = frozenset({"pretrained", "weights", "pretrained_cfg_overlay", "checkpoint_path", "pretrained_file"})
# No weights to fetch: nothing to check or to reword.
_NO_FETCH = contextlib.nullcontext()


def _torchvision_names() -> List[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names() -> List[str]:
    import timm

    return list(timm.list_models())


def _registry_names() -> List[str]:
    from .models import list_models

    return list(list_models())


def _is_torchvision(name: str) -> bool:
    return name in _torchvision_names()


def _is_timm(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _is_registered(name: str) -> bool:
    from .models import is_model

    return bool(is_model(name))


_LOOKUPS: Dict[str, Callable[[str], bool]] = {
    "torchvision": _is_torchvision,
    "auglocal": _is_registered,
    "timm": _is_timm,
}
_LISTS: Dict[str, Callable[[], List[str]]] = {
    "torchvision": _torchvision_names,
    "auglocal": _registry_names,
    "timm": _timm_names,
}


def list_model_names(library: Optional[str] = None) -> List[str]:
    """Every model name auglocal-fx can build, or only those of ``library`` ("torchvision", "timm", "auglocal").

    Plain names: a name that several libraries know resolves by the order in the module docstring.
    """
    if library is not None:
        library = _PREFIXES.get(library, library)
        if library not in _LISTS:
            raise ValueError(f"unknown model library {library!r}; expected one of: torchvision, auglocal, timm")
        return sorted(_LISTS[library]())
    names = set()
    for lister in _LISTS.values():
        names.update(lister())
    return sorted(names)


def _suggest(name: str, library: Optional[str]) -> str:
    if library is None:
        candidates = list_model_names()
        prefix = ""
    else:
        candidates = list_model_names(library)
        prefix = f"{_CANONICAL_PREFIX[library]}:"
    bare = name.split(".", 1)[0] if library in (None, "timm") else name  # drop a timm pretrained tag
    matches = difflib.get_close_matches(bare, candidates, n=5, cutoff=0.6)
    if not matches:
        matches = difflib.get_close_matches(bare.lower(), [c.lower() for c in candidates], n=5, cutoff=0.5)
    if matches:
        return "did you mean " + ", ".join(prefix + m for m in matches) + "?"
    return "see timm.list_models(), torchvision.models.list_models() or auglocal_fx.models.list_models()"


def _split_python_path(name: str) -> Tuple[str, str]:
    module_name, _, attr = name.partition(":")
    parts = module_name.split(".") + attr.split(".")
    if not module_name or not attr or not all(p.isidentifier() for p in parts):
        raise ValueError(
            f"model name {name!r} looks like a 'package.module:factory' path but is not one; "
            "write it as e.g. 'my_project.nets:build_net'"
        )
    return module_name, attr


def _import_factory(name: str) -> Callable[..., nn.Module]:
    module_name, attr = _split_python_path(name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"cannot build model {name!r}: module {module_name!r} cannot be imported ({exc}); install the package "
            "or run from the folder that holds it"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"cannot build model {name!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"cannot build model {name!r}: {module_name}.{attr} is not callable")
    return factory


def resolve_model_name(name: str) -> Tuple[str, str]:
    """Which library builds ``name``: returns ``(library, canonical_name)``.

    ``library`` is "torchvision", "auglocal", "timm" or "python" (a ``package.module:factory`` path, imported to
    check it exists). ``canonical_name`` is the name within that library (the prefix removed).

    Raises:
        ValueError: the name is unknown; the message lists the closest known names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    name = name.strip()
    prefix, sep, rest = name.partition(":")
    if sep:
        library = _PREFIXES.get(prefix)
        if library is None:
            _import_factory(name)
            return "python", name
        if not rest:
            raise ValueError(f"model name {name!r} has a library prefix but no model name, e.g. '{prefix}:resnet50'")
        if not _LOOKUPS[library](rest):
            raise ValueError(f"unknown {library} model {rest!r}; {_suggest(rest, library)}")
        return library, rest
    for library, lookup in _LOOKUPS.items():
        if lookup(name):
            return library, name
    raise ValueError(f"unknown model {name!r}; {_suggest(name, None)}")


def _qualified_name(library: str, canonical: str) -> str:
    return canonical if library == "python" else f"{_CANONICAL_PREFIX[library]}:{canonical}"


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def create_model(
    name: str,
    *,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    pretrained_file: Optional[Union[str, Path]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a model by name (see the module docstring for how names resolve).

    Args:
        name: ``resnet50``, ``timm:resnet50``, ``tv:resnet50``, ``auglocal:resnet32`` or ``package.module:factory``.
        num_classes: passed to the factory (the classifier's width); ``None`` keeps the factory's default.
        pretrained: let the library fetch its own pretrained weights (timm ``pretrained=True``, torchvision
            ``weights="DEFAULT"``). Weights in the library's local cache need no network; others do, and when
            they cannot be fetched (no network, ``HF_HUB_OFFLINE=1``) :class:`PretrainedWeightsError` says so at
            once, naming the weights and the offline way on.
        pretrained_file: a local ``.safetensors`` file or a ``.pth``/``.pt`` state_dict (read with
            ``torch.load(weights_only=True)``, never unpickling arbitrary objects). When ``num_classes`` differs
            from the file's classifier, the classifier keeps its fresh initialisation (with a warning).
        **kwargs: passed to the factory unchanged.

    Returns:
        A new model in training mode. When all the arguments that shape it are JSON-able, it carries
        ``model._auglocal_source = {"name": ..., "kwargs": {...}}``, which :func:`auglocal_fx.save` needs to
        rebuild it.
    """
    if pretrained and pretrained_file is not None:
        raise ValueError("pass either pretrained=True (the library downloads its weights) or pretrained_file=..., not both")
    library, canonical = resolve_model_name(name)
    factory_kwargs = dict(kwargs)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        factory_kwargs["num_classes"] = num_classes

    qualified = _qualified_name(library, canonical)
    if library == "torchvision":
        import torchvision.models

        weights = factory_kwargs.pop("weights", "DEFAULT" if pretrained else None)
        fetches = weights is not None  # a torchvision weights= name or enum fetches weights too
        source = locate_weights(library, canonical, weights=weights) if fetches else None
        with fetching(qualified, source) if fetches else _NO_FETCH:
            model = torchvision.models.get_model(canonical, weights=weights, **factory_kwargs)
    elif library == "timm":
        import timm

        source = locate_weights(library, canonical, kwargs=factory_kwargs) if pretrained else None
        with fetching(qualified, source) if pretrained else _NO_FETCH:
            model = timm.create_model(canonical, pretrained=pretrained, **factory_kwargs)
    elif library == "auglocal":
        if pretrained:
            raise ValueError(
                f"auglocal-fx's own model {canonical!r} has no downloadable weights; pass pretrained_file=... instead"
            )
        from .models import create_registered_model

        model = create_registered_model(canonical, **factory_kwargs)
    else:
        factory = _import_factory(canonical)
        if pretrained:
            factory_kwargs["pretrained"] = True
        with fetching(qualified, None) if pretrained else _NO_FETCH:  # where it fetches from is its own business
            model = factory(**factory_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")

    if pretrained_file is not None:
        load_pretrained_file(model, pretrained_file, num_classes=num_classes)

    source_kwargs = {k: v for k, v in factory_kwargs.items() if k not in _WEIGHT_KWARGS}
    if _json_able(source_kwargs):
        setattr(model, SOURCE_ATTR, {"name": qualified, "kwargs": source_kwargs})
    return model


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({str(exc).splitlines()[0]}); "
            "save the weights as a state_dict of tensors, or as .safetensors"
        ) from exc
    # Training checkpoints wrap the weights: {"state_dict": ...}, {"model": ...} (timm, torchvision references).
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), found {type(obj).__name__}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _preview(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_pretrained_file(
    model: nn.Module, path: Union[str, Path], *, num_classes: Optional[int] = None
) -> nn.Module:
    """Load a local weights file into ``model`` in place, strictly (every key, every shape) and return it.

    The one exception: when ``num_classes`` is given, tensors whose leading dimension is ``num_classes`` in the
    model but differs in the file (the classifier of a model pretrained on another label set) are skipped and
    keep their initialisation, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {str(path)!r} does not exist")
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    reset = [
        k for k in mismatched
        if num_classes is not None and own[k].dim() >= 1 and own[k].shape[0] == num_classes
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
    wrong = [k for k in mismatched if k not in reset]
    if wrong:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
        problems.append(f"{len(wrong)} shape mismatches ({_preview(shapes, 3)})")
    if problems:
        raise ValueError(
            f"{path} does not fit this {type(model).__name__}: " + "; ".join(problems)
            + ". Is it a state_dict of the same architecture (and the same num_classes)?"
        )
    for k in reset:
        del state[k]
    if reset:
        warnings.warn(
            f"{path}: the classifier ({', '.join(reset)}) was trained for another number of classes; it keeps its "
            f"fresh initialisation for num_classes={num_classes}",
            stacklevel=2,
        )
    model.load_state_dict(state, strict=not reset)
    return model
