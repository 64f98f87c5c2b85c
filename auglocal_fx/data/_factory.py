"""One entry point from a data set name to a split: ``create_dataset("cifar10", split="train", ...)``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from torch.utils.data import Dataset

from ._base import DataError, dataset_info

__all__ = ["create_dataset", "num_classes_of"]

_SPLITS = ("train", "test")


def create_dataset(
    name: str,
    *,
    split: str,
    root: Optional[Union[str, Path]] = None,
    download: bool = False,
    transform: Optional[Callable] = None,
    train_dir: str = "train",
    eval_dir: str = "val",
) -> Dataset:
    """The ``"train"`` or ``"test"`` split of data set ``name`` (see :func:`list_datasets`).

    Nothing is downloaded unless ``download=True``; a missing data set raises :class:`DataError`
    saying where it was looked for.
    """
    dataset_info(name)  # raises DataError for an unknown name
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; accepted: {', '.join(_SPLITS)}")
    path = Path(root).expanduser() if root is not None else None
    if name == "digits":
        from ._digits import digits_dataset

        return digits_dataset(split=split, transform=transform)
    if name in ("imagenet", "imagefolder"):
        from ._folder import folder_dataset

        return folder_dataset(path, split=split, train_dir=train_dir, eval_dir=eval_dir, transform=transform)
    from ._torchvision import torchvision_dataset

    return torchvision_dataset(name, split=split, root=path, download=download, transform=transform)


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a loaded data set (``.classes``; for a Subset, of the data set under it)."""
    base = dataset
    while hasattr(base, "dataset") and not hasattr(base, "classes"):
        base = base.dataset
    classes = getattr(base, "classes", None)
    if classes is None:
        raise DataError(f"cannot tell the number of classes of {type(dataset).__name__}; set model.num_classes")
    return len(classes)
