"""ImageFolder trees: ImageNet (``root/train``, ``root/val``) and any data set in that layout."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ._base import DataError

__all__ = ["folder_dataset"]


def folder_dataset(
    root: Optional[Path],
    *,
    split: str,
    train_dir: str = "train",
    eval_dir: str = "val",
    transform: Optional[Callable] = None,
) -> Dataset:
    """``torchvision.datasets.ImageFolder`` over ``root/train_dir`` (split ``"train"``) or ``root/eval_dir``."""
    from torchvision.datasets import ImageFolder

    if root is None:
        raise DataError("folder data sets need data.root: the folder holding the train and val sub-folders")
    folder = Path(root) / (train_dir if split == "train" else eval_dir)
    if not folder.is_dir():
        key = "data.train_dir" if split == "train" else "data.eval_dir"
        raise DataError(f"{folder} is not a folder; check data.root and {key}")
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read image folder {folder}: {e}") from None
