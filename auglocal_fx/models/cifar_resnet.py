"""The CIFAR ResNets of the AugLocal paper (He et al., 2016, section 4.2).

ResNet-``depth`` for 32x32 inputs: a conv3x3-bn-relu stem, three stages of ``n = (depth - 2) / 6``
BasicBlocks with widths 16-32-64 (the second and third stage halve the resolution), then global
average pooling and a linear classifier. Following the AugLocal/InfoPro reference code, a block that
changes shape uses a 1x1 conv + BN projection shortcut.

The module layout mirrors torchvision's ResNet (``conv1``/``bn1``/``relu`` stem, ``layer1``..``layer3``
as ``nn.Sequential`` of blocks, ``avgpool``, ``fc``), so that auglocal-fx's unit discovery sees the stem
plus ``3n`` blocks as units: ResNet-32 has 16 units, ResNet-110 has 55.

Example::

    from auglocal_fx.models import create_registered_model
    model = create_registered_model("resnet32", num_classes=100)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ._registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "reference_init"]


def reference_init(module: nn.Module) -> nn.Module:
    """The reference's init of every conv (its ResNets and its aux nets): ``N(0, sqrt(2 / (k*k*out)))``; BN 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (projection shortcut when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-``depth`` for CIFAR-sized inputs (``depth = 6n + 2``).

    Args:
        depth: 8, 20, 32, 44, 56, 110, ... (any ``6n + 2``).
        num_classes: size of the linear classifier.
        in_chans: number of input channels (1 for grayscale data).
        width: width of the first stage; the stages are ``width``, ``2*width``, ``4*width`` (16 in the paper).
        zero_init_residual: start each block's last BN at zero, so every block starts as the identity.
    """

    def __init__(
        self,
        *,
        depth: int = 32,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 16,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth}")
        if width < 1 or num_classes < 1 or in_chans < 1:
            raise ValueError(
                f"CifarResNet needs positive width, num_classes and in_chans, got "
                f"width={width}, num_classes={num_classes}, in_chans={in_chans}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.num_features = 4 * width
        # timm-style config: auglocal_fx.convert reads input_size from here when none is given.
        self.pretrained_cfg: Dict[str, Any] = {
            "input_size": (in_chans, 32, 32),
            "num_classes": num_classes,
            "classifier": "fc",
            "first_conv": "conv1",
        }

        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._in_planes = width
        self.layer1 = self._make_stage(width, n, stride=1)
        self.layer2 = self._make_stage(2 * width, n, stride=2)
        self.layer3 = self._make_stage(4 * width, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self._init_weights(zero_init_residual=zero_init_residual)

    def _make_stage(self, planes: int, blocks: int, *, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = []
        for i in range(blocks):
            layers.append(BasicBlock(self._in_planes, planes, stride=stride if i == 0 else 1))
            self._in_planes = planes
        return nn.Sequential(*layers)

    def _init_weights(self, *, zero_init_residual: bool) -> None:
        reference_init(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
        self.pretrained_cfg["num_classes"] = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(name: str, depth: int, *, num_classes: int, in_chans: int, **kwargs: Any) -> CifarResNet:
    model = CifarResNet(depth=depth, num_classes=num_classes, in_chans=in_chans, **kwargs)
    # Lets auglocal_fx.convert record how to rebuild this model (stored in the saved plan).
    model._auglocal_source = {
        "name": f"auglocal:{name}",
        "kwargs": {"num_classes": num_classes, "in_chans": in_chans, **kwargs},
    }
    return model


@register_model
def resnet8(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-8 (3 stages x 1 block, 4 units): the smallest member, for quick runs and tests."""
    return _create("resnet8", 8, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet20(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (3 stages x 3 blocks, 10 units)."""
    return _create("resnet20", 20, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet32(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (3 stages x 5 blocks, 16 units): the paper's K=16 model."""
    return _create("resnet32", 32, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet44(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-44 (3 stages x 7 blocks, 22 units)."""
    return _create("resnet44", 44, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet56(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (3 stages x 9 blocks, 28 units)."""
    return _create("resnet56", 56, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def resnet110(*, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-110 (3 stages x 18 blocks, 55 units): the paper's K=55 model."""
    return _create("resnet110", 110, num_classes=num_classes, in_chans=in_chans, **kwargs)

