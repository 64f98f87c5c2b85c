"""Durable writes: fsync a file or a folder (a rename is only crash-safe once its folder is fsynced), and a text
file replaced atomically."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_path", "atomic_write_text"]


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


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader or a crash sees the old file or the new one, never a part:
    write a temporary file beside it, fsync, rename over it, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
