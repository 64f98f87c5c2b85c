"""Installed versions of auglocal-fx and the libraries it builds on, for manifests, reports and ``--version``."""
from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Optional

__all__ = ["package_version"]


def package_version(dist: str, module: Optional[str] = None) -> Optional[str]:
    """The installed version of distribution ``dist``; else ``module.__version__`` (a source tree that was not
    pip-installed); else None."""
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:
        if module is None:
            return None
        try:
            return getattr(importlib.import_module(module), "__version__", None)
        except ImportError:
            return None
