"""Real data sets for training (no fakes, nothing downloaded unless asked) and their timm transforms.

Data sets: ``digits`` (scikit-learn, ships with it), ``fashion_mnist`` (torchvision, or the IDX files of
Debian's ``dataset-fashion-mnist``), ``cifar10``, ``cifar100``, ``svhn``, ``stl10`` (torchvision, with
``root`` and ``download``), ``imagenet`` and ``imagefolder`` (ImageFolder trees).

Example::

    from auglocal_fx.data import create_dataset, create_transforms, dataset_info
    info = dataset_info("cifar10")
    tf = create_transforms(input_size=(3, 32, 32), is_training=True, augment=info.augment,
                           native_size=info.img_size, mean=info.mean, std=info.std)
    train_set = create_dataset("cifar10", split="train", root="~/data", transform=tf)
"""
from ._arrays import ArrayDataset
from ._base import DATASETS, DataError, DatasetInfo, dataset_info, default_root, list_datasets
from ._factory import create_dataset, num_classes_of
from ._idx import DEBIAN_FASHION_MNIST, read_idx
from ._loader import EpochSampler, create_loader, seeded_subset, set_loader_epoch
from ._transforms import AUGMENTATIONS, create_transforms

__all__ = [
    "ArrayDataset", "AUGMENTATIONS", "DATASETS", "DEBIAN_FASHION_MNIST", "DataError", "DatasetInfo", "EpochSampler",
    "create_dataset", "create_loader", "create_transforms", "dataset_info", "default_root", "list_datasets",
    "num_classes_of", "read_idx", "seeded_subset", "set_loader_epoch",
]
