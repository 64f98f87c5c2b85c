"""Durable writes: fsync a file or a folder (a rename is only crash-safe once its folder is fsynced)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path"]


def fsync_path(path: Path) -> None:
    """fsync ``path``; for a folder this makes the renames inside it durable. A no-op where folders cannot be opened."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        return  # some platforms (Windows) cannot open folders; the file fsyncs still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
