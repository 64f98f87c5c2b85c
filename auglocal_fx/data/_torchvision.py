"""Fashion-MNIST, CIFAR-10/100, SVHN and STL-10 through torchvision (downloaded only when asked).

With ``download=True`` a data set already on disk is used as it is, with no network. One that is missing is
downloaded by torchvision, after one quick look at whether its host can be reached: offline, a :class:`DataError`
says so at once, naming the data set, the URL and the offline way on, instead of a bare ``<urlopen error ...>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ._base import DataError
from ._idx import DEBIAN_FASHION_MNIST, find_idx_file, idx_dataset

__all__ = ["torchvision_dataset"]

_CLASSES = {"fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN",
            "stl10": "STL10"}


def _fashion_mnist_idx(root: Optional[Path], *, split: str, download: bool,
                       transform: Optional[Callable]) -> Optional[Dataset]:
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
    return None


def _construct(cls: type, path: str, *, split: str, download: bool, transform: Optional[Callable]) -> Dataset:
    if cls.__name__ in ("SVHN", "STL10"):
        return cls(path, split=split, download=download, transform=transform)
    return cls(path, train=split == "train", download=download, transform=transform)


def _download_url(cls: type, split: str) -> Optional[str]:
    """The first URL torchvision's ``cls.download()`` fetches (its host is the one to reach)."""
    if getattr(cls, "url", None):  # CIFAR10/100, STL10
        return cls.url
    if getattr(cls, "mirrors", None):  # (Fashion-)MNIST
        return cls.mirrors[0]
    split_list = getattr(cls, "split_list", None)  # SVHN
    if split_list and split in split_list:
        return split_list[split][0]
    return None


def torchvision_dataset(
    name: str, *, split: str, root: Optional[Path], download: bool, transform: Optional[Callable] = None
) -> Dataset:
    """One split (``"train"`` or ``"test"``) of a torchvision data set; ``root=None`` means ``default_root()``."""
    if name not in _CLASSES:
        raise DataError(f"{name!r} is not a torchvision data set known to auglocal_fx")
    if name == "fashion_mnist":
        found = _fashion_mnist_idx(root, split=split, download=download, transform=transform)
        if found is not None:
            return found

    import torchvision.datasets as tvd

    from ._base import default_root

    cls = getattr(tvd, _CLASSES[name])
    where = root or default_root()
    try:  # on disk already: no network, even with download=True
        return _construct(cls, str(where), split=split, download=False, transform=transform)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted ..."
        if not download:
            raise DataError(_not_found(name, root, e)) from None
    url = _download_url(cls, split)
    if url is not None:
        from .._network import unreachable_reason

        reason = unreachable_reason(url)
        if reason is not None:
            raise DataError(_cannot_download(name, where, url, reason))
    try:
        return _construct(cls, str(where), split=split, download=True, transform=transform)
    except (RuntimeError, OSError) as e:  # URLError, an HTTP error, a failed checksum, a full disk
        raise DataError(_cannot_download(name, where, url, " ".join(str(e).split()) or type(e).__name__)) from e


def _not_found(name: str, root: Optional[Path], error: Exception) -> str:
    from ._base import default_root

    where = root or default_root()
    return (
        f"{name} not found under {where} ({error}); set data.root to where it is, "
        "or add data.download: true to download it there"
    )


def _cannot_download(name: str, where: Path, url: Optional[str], reason: str) -> str:
    source = f" from {url}" if url else ""
    return (
        f"cannot download {name} into {where}{source}: {reason}; offline, set data.root to a folder that already "
        "holds it (as torchvision stores it), or download it there once online"
    )
