"""Training and evaluation transforms, built from timm.data.

Evaluation is timm's eval pipeline (resize, centre crop, to tensor, normalise). Training adds one of:

* ``none``: nothing (the eval pipeline).
* ``flip`` / ``crop`` / ``crop_flip``: the CIFAR recipe of the paper (random crop of the native image with
  ``size/8`` zero padding, random horizontal flip), applied at native resolution before timm's pipeline.
* ``rrc``: timm's ImageNet training pipeline (random resized crop, flip, colour jitter, optional
  ``auto_augment`` such as ``"rand-m9-mstd0.5"``, random erasing).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

__all__ = ["AUGMENTATIONS", "create_transforms"]

AUGMENTATIONS = ("none", "flip", "crop", "crop_flip", "rrc")


def create_transforms(
    *,
    input_size: Tuple[int, int, int],
    is_training: bool,
    augment: str = "none",
    native_size: Optional[int] = None,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: Optional[float] = None,
    auto_augment: Optional[str] = None,
    re_prob: float = 0.0,
    scale: Optional[Tuple[float, float]] = None,
) -> Callable:
    """The transform for one split. ``native_size`` is the data set's own resolution (for ``crop``)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; accepted: {', '.join(AUGMENTATIONS)}")
    mean, std = tuple(mean), tuple(std)
    if is_training and augment == "rrc":
        return create_transform(
            input_size,
            is_training=True,
            scale=scale,
            auto_augment=auto_augment,
            re_prob=re_prob,
            interpolation=interpolation,
            mean=mean,
            std=std,
        )

    # crop_pct 1.0 keeps the whole image of small data sets; timm's 0.875 is for ImageNet-style eval.
    pipeline = create_transform(
        input_size, is_training=False, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct or 1.0
    )
    if not is_training or augment == "none":
        return pipeline if not (is_training and re_prob > 0) else T.Compose([pipeline, _erasing(re_prob)])

    pre = []
    if augment in ("crop", "crop_flip"):
        size = native_size or input_size[-1]
        pre.append(T.RandomCrop(size, padding=max(1, round(size / 8))))
    if augment in ("flip", "crop_flip"):
        pre.append(T.RandomHorizontalFlip())
    post = [_erasing(re_prob)] if re_prob > 0 else []
    return T.Compose(pre + [pipeline] + post)


def _erasing(prob: float) -> Callable:
    return RandomErasing(prob, mode="pixel", device="cpu")
