"""Readers for the IDX files of (Fashion-)MNIST, plain or gzipped, e.g. Debian's ``dataset-fashion-mnist``."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ._arrays import ArrayDataset
from ._base import DataError

__all__ = ["read_idx", "find_idx_file", "idx_dataset", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES"]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

_PREFIX = {"train": "train", "test": "t10k"}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or not) into an array of its declared type and shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {array.size} values")
    return array.reshape(shape)


def find_idx_file(root: Path, split: str, kind: str) -> Optional[Path]:
    """``root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, also under ``root/FashionMNIST/raw``."""
    stem = f"{_PREFIX[split]}-{kind}-ubyte"
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def idx_dataset(root: Path, *, split: str, transform: Optional[Callable] = None) -> ArrayDataset:
    images_path = find_idx_file(root, split, "images-idx3")
    labels_path = find_idx_file(root, split, "labels-idx1")
    if images_path is None or labels_path is None:
        raise DataError(f"no Fashion-MNIST IDX files for split {split!r} under {root}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX files under {root} do not match: images {images.shape}, labels {labels.shape}")
    return ArrayDataset(images, labels, transform=transform, classes=list(FASHION_MNIST_CLASSES))
