"""Save and load converted models as a folder of safetensors + JSON (no pickle anywhere).

An artifact is a folder with two files (see docs/artifact.md):

* ``model.safetensors``: the backbone under the original model's state_dict keys with the prefix ``model.``
  (``lm.source_model.state_dict()``, modules unused by the traced graph included) and the aux nets with the prefix
  ``aux.`` (``lm.aux.state_dict()``). Tied tensors are stored once; the other names are listed as aliases in the
  safetensors metadata.
* ``auglocal.json``: the format version, the library versions, how to rebuild the source model (``source``), the
  plan (units, cuts, layers, aux specs, shapes) and the sha256 of ``model.safetensors``.

:func:`load` rebuilds the source model by name, loads its weights, re-applies the plan and loads the aux nets, so
the result has bit-identical weights and outputs. Writing is atomic: the files are written and fsync'ed in a
temporary folder next to the target, then renamed into place.

Example::

    lm = auglocal_fx.convert(auglocal_fx.create_model("resnet18"), layers=9)
    auglocal_fx.save(lm, "runs/r18")
    lm2 = auglocal_fx.load("runs/r18")
    auglocal_fx.export_backbone("runs/r18", "r18.safetensors")    # plain torchvision state_dict
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._fsync import fsync_path
from ._versions import package_version

__all__ = [
    "save",
    "load",
    "export_backbone",
    "read_manifest",
    "ArtifactError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
]

FORMAT_NAME = "auglocal-fx"
FORMAT_VERSION = 1
MANIFEST_FILE = "auglocal.json"
WEIGHTS_FILE = "model.safetensors"
_MODEL_PREFIX = "model."
_AUX_PREFIX = "aux."
_ALIASES_KEY = "auglocal_fx.aliases"  # safetensors metadata: JSON {alias name: stored name}

PathLike = Union[str, "os.PathLike[str]"]


class ArtifactError(ValueError):
    """An artifact folder cannot be written or read; the message names the file and what is wrong with it."""


def _versions() -> Dict[str, Optional[str]]:
    return {
        "auglocal_fx": package_version("auglocal-fx", "auglocal_fx"),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision", "torchvision"),
        "timm": package_version("timm", "timm"),
    }


# ----------------------------------------------------------------------------------------------------------- save


def _check_source(source: Any) -> Dict[str, Any]:
    hint = (
        "build the model with auglocal_fx.create_model(name, ...) before converting it, or pass "
        "source={'name': 'package.module:factory', 'kwargs': {...}} to save()"
    )
    if source is None:
        raise ArtifactError(f"cannot save: the plan does not say how to rebuild the source model; {hint}")
    if not isinstance(source, Mapping) or not isinstance(source.get("name"), str):
        raise ArtifactError(f"cannot save: source must be a dict with a 'name' string, got {source!r}; {hint}")
    kwargs = source.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ArtifactError(f"cannot save: source['kwargs'] must be a dict, got {type(kwargs).__name__}")
    clean = {"name": source["name"], "kwargs": dict(kwargs)}
    try:
        json.dumps(clean, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot save: source {clean!r} is not JSON-serialisable ({exc}); {hint}") from exc
    from .hub import resolve_model_name

    try:
        resolve_model_name(clean["name"])
    except ValueError as exc:
        raise ArtifactError(f"cannot save: the source model could not be rebuilt: {exc}") from exc
    return clean


def _storage_key(t: torch.Tensor) -> Tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def _view_key(t: torch.Tensor) -> Tuple[Any, ...]:
    return _storage_key(t) + (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dedupe(tensors: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Make ``tensors`` writable by safetensors, which refuses tensors that share memory.

    The same view under two names (tied weights) is stored once and the second name recorded as an alias; other
    tensors that overlap a stored one are cloned. Everything is made contiguous and moved to the CPU.
    """
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    views: Dict[Tuple[Any, ...], str] = {}
    storages: set = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.numel() == 0:
            out[name] = t.cpu().contiguous().clone()
            continue
        key = _view_key(t)
        if key in views:
            aliases[name] = views[key]
            continue
        shared = _storage_key(t) in storages
        views[key] = name
        storages.add(_storage_key(t))
        t = t.to("cpu")
        out[name] = t.clone() if shared or not t.is_contiguous() else t
    return out, aliases


# safetensors dtype names (the format's own spelling); a dtype missing here falls back to safetensors' writer.
_DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` as a safetensors file, fsync it and return its sha256, in one pass over the bytes.

    Same format as ``safetensors.torch.save_file`` (8-byte header length, JSON header, then the data in the
    header's order, larger dtypes first so that every tensor is aligned); streaming it avoids building the
    whole file in memory and reading it back to hash it, which matters for the aux nets of large models.
    """
    if any(t.dtype not in _DTYPE_NAMES for t in tensors.values()):
        import safetensors.torch

        safetensors.torch.save_file(dict(tensors), str(path), metadata=dict(metadata))
        fsync_path(path)
        return _sha256(path)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: Dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            digest.update(chunk)
            f.write(chunk)
        for name in order:
            t = tensors[name]
            if t.numel() == 0:
                continue
            data = t.reshape(-1).view(torch.uint8).numpy().data  # raw bytes, no copy (tensors are contiguous)
            digest.update(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"cannot save to {directory}: it exists and is not a folder")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / MANIFEST_FILE).is_file():
        raise ArtifactError(
            f"cannot save to {directory}: the folder is not empty and holds no auglocal-fx artifact; "
            "choose a new or empty folder"
        )
    if not overwrite:
        raise ArtifactError(
            f"cannot save to {directory}: it already holds an artifact; pass overwrite=True "
            "(--overwrite on the command line) to replace it"
        )


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"


def save(
    local_model: nn.Module,
    directory: PathLike,
    *,
    source: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``local_model`` (a :class:`~auglocal_fx.LocalModel`) as an artifact folder ``directory``.

    Args:
        local_model: the result of :func:`auglocal_fx.convert` (trained or not); it is not changed.
        directory: the folder to create. Missing parents are created.
        source: how to rebuild the original model, ``{"name": ..., "kwargs": {...}}`` where ``name`` is anything
            :func:`auglocal_fx.create_model` accepts (``package.module:factory`` for your own model). Defaults to
            ``local_model.plan.source``, which models built with :func:`auglocal_fx.create_model` carry.
        overwrite: replace an artifact already in ``directory``. A folder holding anything else is never touched.

    Returns:
        The artifact folder.

    Raises:
        ArtifactError: no source, a source that cannot be rebuilt, or a target folder that is in the way.
    """
    for attr in ("plan", "aux", "source_model"):
        if not hasattr(local_model, attr):
            raise TypeError(
                f"save() expects a LocalModel made by auglocal_fx.convert(), got {type(local_model).__name__}"
            )
    plan = local_model.plan
    clean_source = _check_source(source if source is not None else getattr(plan, "source", None))
    directory = Path(directory)
    _check_target(directory, overwrite)

    tensors = {_MODEL_PREFIX + k: v for k, v in local_model.source_model.state_dict().items()}
    tensors.update({_AUX_PREFIX + k: v for k, v in local_model.aux.state_dict().items()})
    tensors, aliases = _dedupe(tensors)
    plan_dict = plan.to_dict()
    if isinstance(plan_dict, dict) and "source" in plan_dict:
        plan_dict = {**plan_dict, "source": clean_source}
    versions = _versions()

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(directory, "tmp")
    os.mkdir(staging)
    try:
        weights = staging / WEIGHTS_FILE
        sha256 = _write_safetensors(
            weights, tensors, {"format": "pt", _ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
        )
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "versions": versions,
            "source": clean_source,
            "plan": plan_dict,
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": sha256,
                "bytes": weights.stat().st_size,
                "tensors": len(tensors),
                "aliases": len(aliases),
            },
        }
        _write_json(staging / MANIFEST_FILE, doc)
        fsync_path(staging)
        _install(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    fsync_path(directory.parent)
    return directory


def _install(staging: Path, directory: Path) -> None:
    """Move the finished files into place so that ``directory`` never holds a half-written artifact that loads."""
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    if not directory.exists():
        os.rename(staging, directory)  # atomic: the artifact appears complete or not at all
        return
    # Replacing an artifact in a folder that may hold other files (logs, checkpoints): move the new weights next
    # to the old ones, drop the old manifest first, then swap. A crash in between leaves a folder without a
    # manifest (load says so) or a manifest whose sha256 does not match (load says so), never a wrong model.
    new_weights = _temp_sibling(directory / WEIGHTS_FILE, "new")
    new_manifest = _temp_sibling(directory / MANIFEST_FILE, "new")
    try:
        os.rename(staging / WEIGHTS_FILE, new_weights)
        os.rename(staging / MANIFEST_FILE, new_manifest)
        (directory / MANIFEST_FILE).unlink()
        fsync_path(directory)
        os.replace(new_weights, directory / WEIGHTS_FILE)
        fsync_path(directory)
        os.replace(new_manifest, directory / MANIFEST_FILE)
        fsync_path(directory)
    finally:
        for leftover in (new_weights, new_manifest):
            if leftover.exists():
                leftover.unlink()


# ----------------------------------------------------------------------------------------------------------- load


def read_manifest(directory: PathLike) -> Dict[str, Any]:
    """Read and validate ``directory/auglocal.json`` without touching the weights."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not directory.exists():
        raise ArtifactError(f"no auglocal-fx artifact at {directory}: the folder does not exist")
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory} is a file; an auglocal-fx artifact is a folder holding {MANIFEST_FILE} and {WEIGHTS_FILE}"
        )
    if not manifest.is_file():
        raise ArtifactError(f"no auglocal-fx artifact at {directory}: {manifest} is missing")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest} is not valid JSON ({exc}); the file is truncated or damaged") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(f"{manifest} is not an auglocal-fx manifest (format {found!r}, expected {FORMAT_NAME!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{manifest}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        written_by = (doc.get("versions") or {}).get("auglocal_fx")
        raise ArtifactError(
            f"{manifest} was written by a newer auglocal-fx ({written_by or 'unknown version'}, format_version "
            f"{version}); this auglocal-fx ({_versions()['auglocal_fx']}) reads format_version {FORMAT_VERSION}: "
            "upgrade it with `pip install -U auglocal-fx`"
        )
    for key, kind in (("source", dict), ("plan", dict), ("weights", dict)):
        if not isinstance(doc.get(key), kind):
            raise ArtifactError(f"{manifest}: the {key!r} entry is missing or not a {kind.__name__}")
    weights = doc["weights"]
    name = weights.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"{manifest}: weights.file must be a file name inside the artifact, got {name!r}")
    if not isinstance(weights.get("sha256"), str):
        raise ArtifactError(f"{manifest}: weights.sha256 is missing")
    source = doc["source"]
    if not isinstance(source.get("name"), str) or not isinstance(source.get("kwargs", {}), dict):
        raise ArtifactError(f"{manifest}: source must be {{'name': str, 'kwargs': dict}}, got {source!r}")
    return doc


def _read_weights(directory: Path, doc: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    import safetensors
    import safetensors.torch

    path = directory / doc["weights"]["file"]
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (named by {directory / MANIFEST_FILE})")
    expected = doc["weights"]["sha256"]
    actual = _sha256(path)
    if actual != expected:
        raise ArtifactError(
            f"{path} does not match the sha256 recorded in {directory / MANIFEST_FILE} "
            f"(expected {expected[:12]}..., found {actual[:12]}...): the file is truncated, damaged or was replaced"
        )
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    except Exception as exc:  # SafetensorError, JSON errors: all mean a damaged file
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc})") from exc
    for alias, stored in aliases.items():
        if stored not in tensors:
            raise ArtifactError(f"{path}: alias {alias!r} points to {stored!r}, which is not in the file")
        tensors[alias] = tensors[stored]
    return tensors


def _split(tensors: Mapping[str, torch.Tensor], path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    model_sd: Dict[str, torch.Tensor] = {}
    aux_sd: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith(_MODEL_PREFIX):
            model_sd[key[len(_MODEL_PREFIX):]] = value
        elif key.startswith(_AUX_PREFIX):
            aux_sd[key[len(_AUX_PREFIX):]] = value
        else:
            raise ArtifactError(f"{path}: tensor {key!r} has neither the 'model.' nor the 'aux.' prefix")
    return model_sd, aux_sd


def _preview(keys: List[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path, note: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and (tuple(state[k].shape) != tuple(own[k].shape) or state[k].dtype != own[k].dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if shapes:
        problems.append(f"different shape or dtype: {_preview(shapes)}")
    if problems:
        raise ArtifactError(f"{path} does not match its plan ({what}: " + "; ".join(problems) + ")" + note)
    # safetensors keeps tensors only; modules that check their state_dict version (torchvision's MNASNet) need
    # the version metadata a state_dict of this very architecture carries.
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    module.load_state_dict(state, strict=True)


def _version_note(doc: Mapping[str, Any]) -> str:
    saved = doc.get("versions") or {}
    current = _versions()
    diffs = [f"{k} {saved[k]} (now {current[k]})" for k in ("torch", "torchvision", "timm") if saved.get(k) != current[k]]
    return f"; the artifact was written with {', '.join(diffs)}" if diffs else ""


def load(directory: PathLike) -> nn.Module:
    """Load an artifact written by :func:`save`: a :class:`~auglocal_fx.LocalModel` with the saved weights.

    The source model is rebuilt with :func:`auglocal_fx.create_model` from the manifest's ``source``, its weights
    loaded strictly, the saved plan re-applied with :func:`auglocal_fx.apply_plan`, and the aux nets loaded
    strictly. The model is on the CPU, in training mode (call ``.eval()`` / ``.to(device)`` as needed).

    Raises:
        ArtifactError: a missing, truncated or tampered file, a manifest from an incompatible version, or weights
            that do not fit the plan; the message names the file. ``PlanMismatchError`` details are included.
    """
    directory = Path(directory)
    doc = read_manifest(directory)
    manifest = directory / MANIFEST_FILE
    weights_path = directory / doc["weights"]["file"]
    tensors = _read_weights(directory, doc)
    model_sd, aux_sd = _split(tensors, weights_path)
    note = _version_note(doc)

    from . import Plan, apply_plan
    from .hub import create_model

    source = doc["source"]
    try:
        model = create_model(source["name"], **source.get("kwargs", {}))
    except Exception as exc:
        raise ArtifactError(f"{manifest}: cannot rebuild the source model {source['name']!r}: {exc}{note}") from exc
    _load_strict(model, model_sd, "backbone", weights_path, note)
    try:
        plan = Plan.from_dict(doc["plan"])
    except Exception as exc:
        raise ArtifactError(f"{manifest}: the plan cannot be read by this auglocal-fx ({exc}){note}") from exc
    try:
        local_model = apply_plan(model, plan)
    except ValueError as exc:
        raise ArtifactError(
            f"{manifest}: the saved plan does not fit the rebuilt {source['name']!r} ({exc}){note}"
        ) from exc
    _load_strict(local_model.aux, aux_sd, "aux nets", weights_path, note)
    return local_model


# --------------------------------------------------------------------------------------------------------- export


def export_backbone(directory: PathLike, output_file: PathLike, *, overwrite: bool = False) -> Path:
    """Write the backbone of an artifact as a plain state_dict file of the original model.

    The keys are the original model's own, so ``model.load_state_dict(safetensors.torch.load_file(output_file))``
    works on a freshly created original model (and timm's ``pretrained_cfg_overlay=dict(file=output_file)``).
    The model is not rebuilt; the weights are checked against the manifest's sha256 first.
    """
    directory = Path(directory)
    output_file = Path(output_file)
    doc = read_manifest(directory)
    if output_file.exists() and (output_file.is_dir() or not overwrite):
        what = "a folder" if output_file.is_dir() else "a file; pass overwrite=True (--overwrite) to replace it"
        raise ArtifactError(f"cannot export to {output_file}: it exists and is {what}")
    tensors = _read_weights(directory, doc)
    model_sd, _ = _split(tensors, directory / doc["weights"]["file"])
    if not model_sd:
        raise ArtifactError(f"{directory / doc['weights']['file']} holds no backbone ('model.') tensors")
    # Aliases point at the same tensor after loading; safetensors wants one storage per name.
    seen: set = set()
    for key, value in model_sd.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr is not None and ptr in seen:
            model_sd[key] = value.clone()
        seen.add(ptr)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(output_file, "tmp")
    try:
        _write_safetensors(staging, model_sd, {"format": "pt", "auglocal_fx.source": json.dumps(doc["source"])})
        os.replace(staging, output_file)
    finally:
        if staging.exists():
            staging.unlink()
    fsync_path(output_file.parent)
    return output_file
