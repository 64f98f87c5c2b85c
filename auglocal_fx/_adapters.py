"""Shape adapters: what an aux net puts in front of a copied unit whose input shape differs from what it receives.

Shapes are read without the batch dimension and interpreted with a *layout*: ``"vec"`` (C,), ``"tokens"``
(N, C), ``"chw"`` (C, H, W) or ``"hwc"`` (H, W, C, as in Swin). The adapter resamples the positions (average
pooling down, interpolation up, flattening a map into tokens or folding tokens into a map) and projects the
channels with a 1x1 convolution and batch norm, like a ResNet's downsample shortcut.

Example::

    ShapeAdapter((64, 56, 56), (512, 28, 28), "chw", "chw")   # avg-pool 2x, 1x1 conv 64->512, BN
    ShapeAdapter((197, 384), (197, 768), "tokens", "tokens")    # 1x1 projection of the channels
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShapeAdapter", "infer_layout"]


def infer_layout(shape: Sequence[int], aspect: float) -> str:
    """Guess the layout of a per-sample shape; ``aspect`` is the input image's H/W."""
    if len(shape) == 1:
        return "vec"
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        a, b, c = shape
        chw = math.isclose(b / c, aspect, rel_tol=0.1) or (b == c)
        hwc = math.isclose(a / b, aspect, rel_tol=0.1) or (a == b)
        if hwc and not chw:
            return "hwc"
        return "chw"
    raise ValueError(f"no shape adapter for a per-sample shape of rank {len(shape)}: {tuple(shape)}")


def _split(shape: Sequence[int], layout: str) -> Tuple[int, Tuple[int, ...]]:
    """(channels, positions) of a shape."""
    if layout == "vec":
        return shape[0], ()
    if layout == "tokens":
        return shape[1], (shape[0],)
    if layout == "chw":
        return shape[0], (shape[1], shape[2])
    if layout == "hwc":
        return shape[2], (shape[0], shape[1])
    raise ValueError(f"unknown layout {layout!r}")


def _resample(x: torch.Tensor, positions: Tuple[int, ...]) -> torch.Tensor:
    """Resample (B, C, *p) to (B, C, *positions)."""
    current = tuple(x.shape[2:])
    if current == positions:
        return x
    if not positions:
        return x.flatten(2).mean(dim=2) if current else x
    if not current:
        return x.reshape(*x.shape, *([1] * len(positions))).expand(*x.shape, *positions)
    if len(current) == 2 and len(positions) == 2:
        if positions[0] <= current[0] and positions[1] <= current[1]:
            return F.adaptive_avg_pool2d(x, positions)
        return F.interpolate(x, size=positions, mode="bilinear", align_corners=False)
    # Through a 1-D sequence: flatten maps into tokens, fold tokens into maps.
    seq = x.flatten(2)
    n_out = math.prod(positions)
    if n_out <= seq.shape[2]:
        seq = F.adaptive_avg_pool1d(seq, n_out)
    else:
        seq = F.interpolate(seq, size=n_out, mode="linear", align_corners=False)
    return seq.reshape(*seq.shape[:2], *positions)


class ShapeAdapter(nn.Module):
    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_layout: str, out_layout: str):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.in_layout, self.out_layout = in_layout, out_layout
        c_in, _ = _split(self.in_shape, in_layout)
        c_out, self.out_positions = _split(self.out_shape, out_layout)
        rank = len(self.out_positions)
        if c_in == c_out:
            self.proj, self.norm = nn.Identity(), nn.Identity()
        elif rank == 0:
            self.proj, self.norm = nn.Linear(c_in, c_out, bias=False), nn.BatchNorm1d(c_out)
        elif rank == 1:
            self.proj, self.norm = nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out)
        else:
            self.proj, self.norm = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)

    def extra_repr(self) -> str:
        return f"{self.in_shape} {self.in_layout} -> {self.out_shape} {self.out_layout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # To channels-first (B, C, *positions), resample, project, back to the target layout.
        if self.in_layout == "tokens":
            x = x.transpose(1, 2)
        elif self.in_layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        x = _resample(x, self.out_positions)
        x = self.norm(self.proj(x))
        if self.out_layout == "tokens":
            x = x.transpose(1, 2)
        elif self.out_layout == "hwc":
            x = x.permute(0, 2, 3, 1)
        return x.contiguous()
