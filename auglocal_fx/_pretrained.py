"""A library's own pretrained weights: read from its cache, or fetched, or one clear error at once.

timm (the Hugging Face hub, or a URL) and torchvision (download.pytorch.org) fetch their weights themselves, and
auglocal-fx keeps their loading code. It only looks first at where the weights would come from:

* in the library's local cache: used as they are, with no network (the hub then falls back to its cache at once);
* not cached, and the hub's offline switch (``HF_HUB_OFFLINE=1``) is on, or the host cannot be reached
  (one connection, a few seconds at most): :class:`PretrainedWeightsError` right away, instead of the hub's
  retries (about 40 s) or a bare ``<urlopen error ...>``;
* otherwise the library downloads them; a download that fails all the same raises the same error.

Example::

    >>> create_model("timm:resnet18", pretrained=True)          # offline, weights not cached
    PretrainedWeightsError: cannot fetch the pretrained weights of timm:resnet18 (timm/resnet18.a1_in1k from the
    Hugging Face hub): huggingface.co is unreachable ([Errno -2] Name or service not known), and they are not in the
    local cache; offline, pass a local weights file with pretrained_file=PATH, or fetch them once online into the
    cache /root/.cache/huggingface/hub
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from ._network import unreachable_reason

__all__ = ["PretrainedWeightsError", "WeightsSource", "locate_weights", "fetching"]

# Keyword arguments that point timm at other weights than its registry's: then auglocal-fx does not guess.
_TIMM_WEIGHT_OVERRIDES = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
# timm asks the hub for pytorch_model.bin and tries model.safetensors first; either one in the cache will do.
_HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class WeightsSource:
    """Where a library fetches a model's pretrained weights from, and whether they are in its cache already."""

    description: str  # "timm/resnet18.a1_in1k from the Hugging Face hub", or the URL
    url: str  # its host is the one that must be reachable
    cache: str  # the file, or the cache folder, where the library keeps them
    cache_is_file: bool
    cached: bool
    offline: bool = False  # the hub's offline switch is on: it will not download


class PretrainedWeightsError(ConnectionError):
    """A library's pretrained weights cannot be fetched; the message names them and the offline way on.

    ``file_hint`` is how the caller's front end spells "a local weights file": ``pretrained_file=PATH`` in Python,
    ``--pretrained-file PATH`` on the command line (see :meth:`with_file_hint`).
    """

    def __init__(self, *, model: str, source: Optional[WeightsSource], reason: str,
                 file_hint: str = "pretrained_file=PATH") -> None:
        self.model, self.source, self.reason, self.file_hint = model, source, reason, file_hint
        super().__init__(self._message())

    def __reduce__(self):  # keyword-only arguments: pickle (a worker process's error) through them
        return _rebuild_error, (self.model, self.source, self.reason, self.file_hint)

    def with_file_hint(self, file_hint: str) -> "PretrainedWeightsError":
        """The same error, its advice worded for another front end (``--pretrained-file PATH``, a recipe field)."""
        error = PretrainedWeightsError(model=self.model, source=self.source, reason=self.reason, file_hint=file_hint)
        error.__cause__ = self.__cause__
        return error

    def _message(self) -> str:
        source = self.source
        if source is None:
            what, cache = "", "or weights its library already has in its local cache"
        elif source.cache_is_file:
            what, cache = f" ({source.description})", f"or put that file at {source.cache}"
        else:
            what, cache = f" ({source.description})", f"or fetch them once online into the cache {source.cache}"
        return (f"cannot fetch the pretrained weights of {self.model}{what}: {self.reason}; offline, pass a local "
                f"weights file with {self.file_hint}, {cache}")


def _rebuild_error(model: str, source: Optional[WeightsSource], reason: str, file_hint: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(model=model, source=source, reason=reason, file_hint=file_hint)


# --------------------------------------------------------------------------------------------- where from


def _torch_cache_file(url: str) -> str:
    import torch.hub

    # torch.hub.load_state_dict_from_url's own choice of file name and folder ($TORCH_HOME/hub/checkpoints).
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(url).path))


def _url_source(url: str) -> WeightsSource:
    path = _torch_cache_file(url)
    return WeightsSource(description=url, url=url, cache=path, cache_is_file=True, cached=os.path.isfile(path))


def _hf_source(location: Any) -> WeightsSource:
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models._hub import hf_split

    hub_id, files = (location[0], (location[1],)) if isinstance(location, tuple) else (location, _HF_DEFAULT_FILES)
    repo_id, revision = hf_split(hub_id)
    cached = any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in files
    )
    return WeightsSource(
        description=f"{hub_id} from the Hugging Face hub",
        url=f"{constants.ENDPOINT}/{repo_id}",
        cache=constants.HF_HUB_CACHE,
        cache_is_file=False,
        cached=cached,
        offline=constants.is_offline_mode(),
    )


def _timm_source(name: str, kwargs: Mapping[str, Any]) -> Optional[WeightsSource]:
    if any(kwargs.get(key) for key in _TIMM_WEIGHT_OVERRIDES):
        return None
    try:  # timm's own resolution of a name (and tag) into the place its weights come from
        from timm.models import get_pretrained_cfg
        from timm.models._builder import _resolve_pretrained_source
    except ImportError:  # another timm layout: no look ahead, its own errors are still wrapped
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag: timm.create_model says so itself
        return None
    if cfg is None:
        return None
    load_from, location = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "hf-hub":
        return _hf_source(location)
    if load_from == "url":
        return _url_source(location)
    return None  # a local file or state_dict, or no weights at all (timm raises its own error)


def _torchvision_source(name: str, weights: Any) -> Optional[WeightsSource]:
    import torchvision.models

    try:
        resolved = torchvision.models.get_model_weights(name).verify(weights)
    except (ValueError, KeyError, TypeError):  # unknown weights: torchvision.models.get_model says so itself
        return None
    url = getattr(resolved, "url", None)
    return _url_source(url) if url else None


def locate_weights(library: str, name: str, *, weights: Any = None,
                   kwargs: Optional[Mapping[str, Any]] = None) -> Optional[WeightsSource]:
    """Where ``library`` ("timm", "torchvision") would fetch the pretrained weights of model ``name``; None when it
    cannot be told ahead (a user's factory, a custom timm cfg). ``weights``: torchvision's ``weights=`` value."""
    if library == "timm":
        return _timm_source(name, kwargs or {})
    if library == "torchvision" and weights is not None:
        return _torchvision_source(name, weights)
    return None


# ------------------------------------------------------------------------------------------------ fetching


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check(model: str, source: Optional[WeightsSource]) -> None:
    if source is None or source.cached:
        return
    if source.offline:
        reason = "the hub's offline switch HF_HUB_OFFLINE is on"
    else:
        reason = unreachable_reason(source.url)
    if reason is not None:
        raise PretrainedWeightsError(
            model=model, source=source, reason=f"{reason}, and they are not in the local cache"
        )


@contextlib.contextmanager
def fetching(model: str, source: Optional[WeightsSource]) -> Iterator[None]:
    """Check that ``source`` can be fetched (unless cached), then run the library's loading code in the block;
    a network or file error inside it becomes :class:`PretrainedWeightsError` naming ``model`` and ``source``."""
    _check(model, source)
    try:
        yield
    except PretrainedWeightsError:
        raise
    except OSError as exc:  # URLError, the hub's LocalEntryNotFoundError / HTTP errors, a full disk, ...
        raise PretrainedWeightsError(model=model, source=source, reason=_first_line(exc)) from exc
