"""A map-style data set over in-memory uint8 images (digits, Fashion-MNIST IDX files)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ArrayDataset"]


class ArrayDataset(Dataset):
    """Images as a ``(N, H, W)`` or ``(N, H, W, C)`` uint8 array and integer targets.

    Items are ``(transform(PIL image), int target)``, like torchvision's data sets, so that the same
    timm/torchvision transforms apply to every data set.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        *,
        transform: Optional[Callable] = None,
        classes: Optional[List[str]] = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"ArrayDataset needs uint8 images of shape (N, H, W[, C]), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"ArrayDataset got {len(images)} images but {len(targets)} targets")
        self.data = images
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.classes = classes if classes is not None else [str(c) for c in sorted(set(self.targets))]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
