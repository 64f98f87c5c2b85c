"""Dataset metadata shared by the loaders, the transforms and the training engine."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["DataError", "DatasetInfo", "DATASETS", "dataset_info", "list_datasets", "default_root"]


class DataError(ValueError):
    """A data set could not be found, read or configured; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a data set before it is loaded.

    ``num_classes`` is ``None`` for folder data sets, whose classes are the sub-folders.
    ``img_size`` is the native resolution; ``augment`` the default training augmentation.
    """

    name: str
    num_classes: Optional[int]
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: str
    crop_pct: float = 1.0
    description: str = ""


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DATASETS: Dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits", 10, 1, 8, (0.30,), (0.38,), "none",
                    description="scikit-learn's 8x8 handwritten digits (1,437 train / 360 test), ships with the package"),
        DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), "crop_flip",
                    description="Fashion-MNIST 28x28 (60,000 / 10,000)"),
        DatasetInfo("cifar10", 10, 3, 32, _CIFAR10_MEAN, _CIFAR10_STD, "crop_flip",
                    description="CIFAR-10 32x32 (50,000 / 10,000)"),
        DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip",
                    description="CIFAR-100 32x32 (50,000 / 10,000)"),
        DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "crop",
                    description="SVHN 32x32 (73,257 / 26,032)"),
        DatasetInfo("stl10", 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), "crop_flip",
                    description="STL-10 96x96, labelled splits (5,000 / 8,000)"),
        DatasetInfo("imagenet", 1000, 3, 224, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "rrc",
                    crop_pct=0.875, description="ImageNet-1k in ImageFolder layout (root/train, root/val)"),
        DatasetInfo("imagefolder", None, 3, 224, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "rrc",
                    crop_pct=0.875, description="any ImageFolder tree (root/train/<class>/..., root/val/<class>/...)"),
    )
}


def list_datasets() -> list:
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; accepted: {', '.join(list_datasets())}") from None


def default_root() -> Path:
    """Where torchvision data sets live when a recipe gives no ``root`` ($AUGLOCAL_DATA or ~/.cache/auglocal_fx/data)."""
    return Path(os.environ.get("AUGLOCAL_DATA", "~/.cache/auglocal_fx/data")).expanduser()
