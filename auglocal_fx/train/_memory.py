"""Peak memory of a training run, on any device: what the comparison table reports per rule.

On CUDA, the caching allocator's peak (``torch.cuda.max_memory_allocated``). On the CPU, the process's peak
resident set (``VmHWM`` in ``/proc/self/status``), reset at the start of each epoch through
``/proc/self/clear_refs`` (Linux; elsewhere there is no figure). Rules trained one after the other in one process
are then measured the same way, side by side.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["reset_peak_memory", "peak_memory_mb"]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    from .._malloc import release_free_memory

    release_free_memory()  # hand freed heap back first, so the previous run's cached memory does not count
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None
