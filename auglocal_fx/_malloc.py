"""The C allocator's knobs, where it is glibc: who holds freed memory decides what a process's RSS shows; and the
kernel's own figures of that RSS (Linux ``/proc/self/status``), its peak mark included.

Example::

    set_mmap_threshold(128 * 1024)   # allocations above 128 KiB get their own mmap, returned to the OS when freed
    release_free_memory()            # hand back what the heap keeps for reuse
    reset_peak_rss(); ...; status_bytes("VmHWM")   # the peak resident set since the reset
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

__all__ = ["set_mmap_threshold", "release_free_memory", "status_bytes", "reset_peak_rss"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter of glibc's malloc.h
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:  # no C library to tune
            _LIBC = False
    return _LIBC or None


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation above ``nbytes`` with its own mmap (as ``MALLOC_MMAP_THRESHOLD_`` would). This also
    turns off glibc's dynamic threshold, which otherwise rises after large frees and keeps freed blocks in the
    heap. False where the C library has no ``mallopt``."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def release_free_memory() -> None:
    """Hand memory the C allocator keeps for reuse back to the OS (glibc ``malloc_trim``), so RSS tracks live data."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def status_bytes(field_name: str) -> Optional[int]:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
