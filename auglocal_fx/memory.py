"""Measure the activation memory a training step holds for backward, on any device (the CPU included).

:class:`SavedTensorTracker` installs ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
for backward is counted (once per storage) from the moment it is saved until autograd lets it go, and the peak
of that sum is the step's activation memory. Parameters are not counted (they are alive anyway).

Example::

    with SavedTensorTracker() as tracker:
        local_model.local_step(images, labels)
    tracker.peak_bytes      # activation bytes alive at the worst moment of the step
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch

__all__ = ["SavedTensorTracker"]


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorTracker:
    """Context manager tracking the bytes of tensors saved for backward; ``peak_bytes`` is the maximum."""

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0  # the largest single storage saved
        self._live: Dict[Tuple[str, int], List[int]] = {}
        self._hooks = None

    def _release(self, key: Tuple[str, int]) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[key]

    def _storage_key(self, tensor: torch.Tensor) -> Tuple[str, int]:
        """What identifies the memory a saved tensor holds (views of one storage count once)."""
        return str(tensor.device), tensor.untyped_storage().data_ptr()

    def saved(self, tensor: torch.Tensor) -> bool:
        """Whether autograd currently holds ``tensor``'s storage for backward."""
        return self._storage_key(tensor) in self._live

    def _pack(self, tensor: torch.Tensor):
        if tensor.is_leaf and tensor.requires_grad:  # a parameter: it stays in memory anyway
            return tensor
        key = self._storage_key(tensor)
        entry = self._live.get(key)
        if entry is None:
            nbytes = tensor.untyped_storage().nbytes()
            self._live[key] = [nbytes, 1]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self.largest_bytes = max(self.largest_bytes, nbytes)
        else:
            entry[1] += 1
        handle = _Saved(tensor)
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> "SavedTensorTracker":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
