"""Hand-written models for the converter tests: functional ops and raw parameters, an untraceable block,
and models auglocal-fx must refuse."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FunctionalNet(nn.Module):
    """No submodules at all: functional convolutions on raw parameters, a residual, a learned scale."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(16))
        self.scale = nn.Parameter(torch.ones(1, 16, 1, 1))
        self.w2 = nn.Parameter(torch.randn(32, 16, 3, 3) * 0.1)
        self.w3 = nn.Parameter(torch.randn(32, 32, 3, 3) * 0.1)
        self.fc_w = nn.Parameter(torch.randn(num_classes, 32) * 0.1)
        self.fc_b = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1)) * self.scale
        x = F.max_pool2d(x, 2)
        x = F.relu(F.conv2d(x, self.w2, padding=1))
        x = x + F.relu(F.conv2d(x, self.w3, padding=1))
        x = x.mean(dim=(2, 3))
        return F.linear(x, self.fc_w, self.fc_b)


class DynamicGate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace through it, so it must become a leaf."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv(x))))
        if y.mean() > 0:
            return x + y
        return x - y


class GatedNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(DynamicGate(16), DynamicGate(16), DynamicGate(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # in the model's own forward: no leaf can help
            x = x * 2
        return self.fc(x.mean((2, 3)))


class FeatureExtractor(nn.Module):
    """Returns a feature map: no classifier head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())

    def forward(self, x):
        return self.convs(x)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return self.fc(f), f


def tiny_net(num_classes: int = 5) -> nn.Sequential:
    """Four conv-BN-ReLU blocks and a linear head: the benchmark's and the planner's smallest model."""

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(
        block(3, 8, 1), block(8, 16, 2), block(16, 16, 1), block(16, 32, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def _pool_tokens(x: torch.Tensor, size):
    """(B, N, C) tokens on a ``size[0] x size[1]`` grid -> pooled 2x, and the new grid size (like timm MViTv2's
    ``reshape_post_pool``)."""
    grid = x.transpose(1, 2).unflatten(2, (size[0], size[1]))
    grid = F.avg_pool2d(grid, 2)
    return grid.flatten(2).transpose(1, 2), [grid.shape[2], grid.shape[3]]


def pool_tokens_opaque(x: torch.Tensor, size):
    """A leaf function: torch.fx records the call, so the grid size it returns is data unless declared a size."""
    return _pool_tokens(x, size)


def pool_tokens_sized(x: torch.Tensor, size):
    """The same, to be registered as a size function (output 1 is the grid size)."""
    return _pool_tokens(x, size)


class PoolingBlock(nn.Module):
    def __init__(self, dim: int, sized: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.sized = sized

    def forward(self, x, size):
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        if self.sized:
            return pool_tokens_sized(x, size)
        return pool_tokens_opaque(x, size)


class PoolingNet(nn.Module):
    """Blocks that pass ``(tokens, grid_size)`` along, the grid size coming out of a leaf function (MViTv2)."""

    def __init__(self, sized: bool, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.ModuleList([PoolingBlock(8, sized) for _ in range(3)])
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.embed(x)
        size = [x.shape[2], x.shape[3]]
        x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x, size = block(x, size)
        return self.head(x.mean(1))
