"""Shared pieces of the rules that build their aux net from the shape of the tensor at a cut (DGL, PredSim,
InfoPro, greedy SL): reading any layer output as a ``C x H x W`` feature map, and the reference's conv init.

The baseline aux nets were written for CIFAR ResNets, whose every cut carries a ``(C, H, W)`` map. Here the same
nets run on whatever crosses the cut, read as a map by :class:`ToMap` according to :func:`feature_map`:

* ``(C, H, W)`` (``"chw"``): as is.
* ``(H, W, C)`` (``"hwc"``, Swin and timm's NHWC stages): permuted to ``(C, H, W)``.
* ``(N, C)`` tokens (``"tokens"``, ViT-like): when ``N = p + h*w`` with ``h/w`` within 10% of the input's aspect
  ratio for the smallest ``p`` in ``0..8`` (and ``4p <= h*w``), the last ``h*w`` tokens are the patch grid and
  the first ``p`` are prefix tokens (class, distillation, register tokens). The mean of the prefix tokens is added to every patch
  position (the "add" readout of DPT, Ranftl et al. 2021), so that the class token, which often only the head
  reads, still learns from the local loss. Otherwise (no grid: pooled or latent tokens) the ``N`` tokens are a
  ``1 x N`` map.
* ``(C,)`` (``"vec"``): a ``1 x 1`` map.

Example::

    feature_map([17, 64], aspect=1.0)   # {'layout': 'tokens', 'in_shape': [17, 64], 'map': [64, 4, 4], 'prefix': 1}
    ToMap("tokens", 1, [64, 4, 4])(torch.randn(2, 17, 64)).shape   # (2, 64, 4, 4)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..models.cifar_resnet import reference_init  # noqa: F401  (re-exported for the rules)

from .._adapters import infer_layout
from ..errors import ConversionError
from ..plan import LayerSpec
from ._base import PlanContext

__all__ = ["feature_map", "token_grid", "ToMap", "to_map", "map_note", "later_downsampling", "reference_init",
           "MAX_PREFIX_TOKENS"]

MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens of the ViTs in timm stay below this
_ASPECT_TOLERANCE = 0.1  # as infer_layout: a grid of a 50x64 input may be 3x4


def token_grid(n: int, aspect: float) -> Tuple[int, int, int]:
    """``(prefix, h, w)``: ``n`` tokens read as ``prefix`` leading tokens and an ``h x w`` patch grid whose
    ``h/w`` matches the input's ``aspect`` (H/W); ``(0, 1, n)`` when no such grid exists.

    >>> token_grid(197, 1.0), token_grid(196, 1.0), token_grid(261, 1.0), token_grid(13, 1.0)
    ((1, 14, 14), (0, 14, 14), (5, 16, 16), (0, 1, 13))
    """
    for prefix in range(0, min(MAX_PREFIX_TOKENS, n - 1) + 1):
        m = n - prefix
        # The factorisation h*w = m whose h/w is closest to the input's aspect ratio.
        best: Optional[Tuple[float, int, int]] = None
        for h in range(1, math.isqrt(m) + 1):
            if m % h:
                continue
            for hh, ww in ((h, m // h), (m // h, h)):
                miss = abs(math.log(hh / ww) - math.log(aspect))
                if best is None or miss < best[0]:
                    best = (miss, hh, ww)
        # Prefix tokens are a few summary tokens in front of a grid, never a large part of the sequence.
        if best is not None and 4 * prefix <= m and math.isclose(best[1] / best[2], aspect, rel_tol=_ASPECT_TOLERANCE):
            return prefix, best[1], best[2]
    return 0, 1, n


def feature_map(shape: Sequence[int], aspect: float) -> Dict[str, Any]:
    """How a layer output of per-sample ``shape`` is read as a ``C x H x W`` map (JSON data for ``AuxSpec.net``).

    Returns ``{"layout", "in_shape", "map": [C, H, W], "prefix"}``; see the module docstring for each layout.
    """
    shape = [int(s) for s in shape]
    try:
        layout = infer_layout(shape, aspect)
    except ValueError:
        raise ConversionError(
            f"a layer output of per-sample shape {tuple(shape)} cannot be read as a feature map (C, H, W), tokens "
            "(N, C) or a vector; cut the model elsewhere (`auglocal inspect` lists the cut points)") from None
    prefix = 0
    if layout == "vec":
        c_h_w = [shape[0], 1, 1]
    elif layout == "hwc":
        c_h_w = [shape[2], shape[0], shape[1]]
    elif layout == "tokens":
        prefix, h, w = token_grid(shape[0], aspect)
        c_h_w = [shape[1], h, w]
    else:
        c_h_w = list(shape)
    return {"layout": layout, "in_shape": shape, "map": c_h_w, "prefix": prefix}


class ToMap(nn.Module):
    """(B, *in_shape) -> (B, C, H, W), without parameters (see :func:`feature_map`)."""

    def __init__(self, layout: str, prefix: int, map_shape: Sequence[int]):
        super().__init__()
        self.layout, self.prefix, self.map_shape = layout, int(prefix), tuple(int(v) for v in map_shape)

    def extra_repr(self) -> str:
        return f"{self.layout} -> {self.map_shape}" + (f", {self.prefix} prefix token(s) added" if self.prefix else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = self.map_shape
        if self.layout == "vec":
            return x[:, :, None, None]
        if self.layout == "hwc":
            return x.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            if self.prefix:
                # DPT's "add" readout: every patch position sees the prefix (class) tokens.
                x = x[:, self.prefix:] + x[:, :self.prefix].mean(dim=1, keepdim=True)
            return x.transpose(1, 2).unflatten(2, (h, w))
        return x


def later_downsampling(layer: LayerSpec, ctx: PlanContext, here: Sequence[int]) -> Optional[List[int]]:
    """The map ``[C, H, W]`` of the first unit after ``layer`` whose map has fewer positions than ``here``
    (the next stage of a pyramid network), or None when no later unit downsamples (the last stage, a ViT)."""
    positions = here[1] * here[2]
    start = layer.units[-1] + 1 if layer.units else len(ctx.units)
    for unit in ctx.units[start:]:
        try:
            later = feature_map(unit.out_shape, ctx.aspect)["map"]
        except ConversionError:
            continue  # a shape no rule reads (rank > 3) says nothing about the next stage
        if later[1] * later[2] < positions:
            return later
    return None


def to_map(net: Dict[str, Any]) -> ToMap:
    """The :class:`ToMap` of a rule's ``AuxSpec.net`` (as made by :func:`feature_map`)."""
    return ToMap(net["layout"], net["prefix"], net["map"])


def map_note(net: Dict[str, Any]) -> str:
    """How the output was read, for summaries: '' for a C x H x W map, e.g. 'tokens 1+4x4: ' otherwise."""
    _, h, w = net["map"]
    if net["layout"] == "tokens":
        return f"tokens {net['prefix']}+{h}x{w}: " if net["prefix"] else f"tokens {h}x{w}: "
    return "" if net["layout"] == "chw" else f"{net['layout']}: "
