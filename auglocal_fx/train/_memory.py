"""Peak memory of a training run, on any device: what the comparison table reports per rule.

On CUDA, the caching allocator's peak (``torch.cuda.max_memory_allocated``). On the CPU, the process's peak
resident set (``VmHWM`` in ``/proc/self/status``), reset at the start of each epoch through
``/proc/self/clear_refs`` (Linux; elsewhere there is no figure). Rules trained one after the other in one process
are then measured the same way, side by side.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._malloc import release_free_memory, reset_peak_rss, status_bytes

__all__ = ["reset_peak_memory", "peak_memory_mb"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_free_memory()  # hand freed heap back first, so the previous run's cached memory does not count
    reset_peak_rss()


def peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = status_bytes("VmHWM")
    return peak / 2**20 if peak is not None else None
