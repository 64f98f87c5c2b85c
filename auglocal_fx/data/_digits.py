"""scikit-learn's handwritten digits: 1,797 8x8 grayscale images, shipped with scikit-learn (no download)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ._arrays import ArrayDataset

__all__ = ["digits_dataset"]

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0  # fixed, so that every run and every rule sees the same test set


def digits_dataset(*, split: str, transform: Optional[Callable] = None) -> ArrayDataset:
    """The ``"train"`` (1,437) or ``"test"`` (360) part of a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; spread them over 0..255 so that they read like any 8-bit image.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=bunch.target
    )
    if split == "train":
        return ArrayDataset(x_train, y_train, transform=transform, classes=[str(i) for i in range(10)])
    return ArrayDataset(x_test, y_test, transform=transform, classes=[str(i) for i in range(10)])
