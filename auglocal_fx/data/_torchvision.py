"""Fashion-MNIST, CIFAR-10/100, SVHN and STL-10 through torchvision (downloaded only when asked)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ._base import DataError
from ._idx import DEBIAN_FASHION_MNIST, find_idx_file, idx_dataset

__all__ = ["torchvision_dataset"]


def _fashion_mnist(root: Optional[Path], *, split: str, download: bool, transform: Optional[Callable]) -> Dataset:
    # IDX files read directly win: Debian's package when no root is given, or a root that holds them.
    for candidate in ([root] if root is not None else [DEBIAN_FASHION_MNIST]):
        if candidate is not None and find_idx_file(candidate, split, "images-idx3") is not None:
            return idx_dataset(candidate, split=split, transform=transform)
    if root is None and not download:
        raise DataError(
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
            f"(IDX files in {DEBIAN_FASHION_MNIST}), or set data.root to a folder holding the IDX files "
            "(add data.download: true to fetch them there)"
        )
    from ._base import default_root
    from torchvision.datasets import FashionMNIST

    return FashionMNIST(str(root or default_root()), train=split == "train", download=download, transform=transform)


def torchvision_dataset(
    name: str, *, split: str, root: Optional[Path], download: bool, transform: Optional[Callable] = None
) -> Dataset:
    """One split (``"train"`` or ``"test"``) of a torchvision data set; ``root=None`` means ``default_root()``."""
    if name == "fashion_mnist":
        try:
            return _fashion_mnist(root, split=split, download=download, transform=transform)
        except RuntimeError as e:  # torchvision's "Dataset not found ..."
            raise DataError(_not_found(name, root, download, e)) from None

    import torchvision.datasets as tvd

    from ._base import default_root

    path = str(root or default_root())
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            return cls(path, train=split == "train", download=download, transform=transform)
        if name == "svhn":
            return tvd.SVHN(path, split=split, download=download, transform=transform)
        if name == "stl10":
            return tvd.STL10(path, split=split, download=download, transform=transform)
    except RuntimeError as e:
        raise DataError(_not_found(name, root, download, e)) from None
    raise DataError(f"{name!r} is not a torchvision data set known to auglocal_fx")


def _not_found(name: str, root: Optional[Path], download: bool, error: Exception) -> str:
    from ._base import default_root

    where = root or default_root()
    if download:
        return f"could not load {name} from {where}: {error}"
    return (
        f"{name} not found under {where} ({error}); set data.root to where it is, "
        "or add data.download: true to download it there"
    )
