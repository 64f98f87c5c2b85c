"""DGL, decoupled greedy learning (Belilovsky, Eickenberg and Oyallon, ICML 2020), as the AugLocal reference
harness runs it.

The aux net of a hidden layer whose output is a ``C x H x W`` map (:mod:`._maps` reads tokens and NHWC outputs as
maps) is the "MLP-SR" head of DGL's auxiliary-net study as the AugLocal harness writes it:

    adaptive avg pool to ceil(H/4) x ceil(W/4)
    3 x [1x1 conv C->C (no bias), BatchNorm2d, ReLU]
    adaptive avg pool to mh x mw, mh = min(ceil(H/4), 2), mw = min(ceil(W/4), 2)
    flatten (F = C*mh*mw features; 4C on maps of 5x5 and up)
    2 x [Linear F->F (no bias), BatchNorm1d, ReLU]
    Linear F->classes

and the loss is cross-entropy alone, scaled by ``lambda_y`` (options ``y1``, ``y2``, both 1: the reference's
``x1 = x2 = 0, y1 = y2 = 1``). How the original differs: DGL's own code has three hidden Linear layers with bias
and trains each layer with its own SGD (lr 0.1, momentum 0.9, wd 5e-4, x0.2 every 15 epochs, 50 epochs); a third
"DGL" head found elsewhere (convs to width 128, global pool, a 512-wide MLP) is not this one either. The reference
sizes the pools from the image size and channel count (CIFAR-ResNet asserts); here they come from the real shape.

Example: a ``16 x 32 x 32`` output with 10 classes gets pools of 8x8 and 2x2, F = 64 and
``3*(16*16 + 2*16) + 2*(64*64 + 2*64) + 64*10 + 10 = 9962`` parameters::

    lm = auglocal_fx.convert(model, layers=16, rule="dgl", input_size=(3, 32, 32))
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..plan import AuxSpec, LayerSpec
from ._base import BuildContext, PlanContext, Rule, register_rule
from ._maps import feature_map, map_note, reference_init, to_map

__all__ = ["DGL", "DGLAux"]


class DGLAux(nn.Module):
    """DGL's aux net from an ``AuxSpec.net`` (see the module docstring); ``forward(h)`` returns class logits."""

    def __init__(self, net: Dict[str, Any]):
        super().__init__()
        c = net["map"][0]
        features = net["features"]
        self.to_map = to_map(net)
        convs = []
        for _ in range(3):
            convs += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        mlp = []
        for _ in range(2):
            mlp += [nn.Linear(features, features, bias=False), nn.BatchNorm1d(features), nn.ReLU()]
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(tuple(net["pool"])), *convs,
            nn.AdaptiveAvgPool2d(tuple(net["mlp_pool"])), nn.Flatten(), *mlp,
            nn.Linear(features, net["classes"]),
        )
        reference_init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.to_map(h))


@register_rule
class DGL(Rule):
    name = "dgl"
    description = "DGL (Belilovsky et al., 2020): 3 x 1x1 conv on a 1/4 pooled map, 2x2 pool, 3-layer MLP; CE"
    # Cross-entropy is its only loss: its weight, interpolated over depth like the reference's lambda_y.
    options = {"y1": 1.0, "y2": 1.0}

    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        net = feature_map(layer.out_shape, ctx.aspect)
        c, h, w = net["map"]
        pool = [math.ceil(h / 4), math.ceil(w / 4)]
        mlp_pool = [min(pool[0], 2), min(pool[1], 2)]
        features = c * mlp_pool[0] * mlp_pool[1]
        net.update(
            classes=ctx.num_classes, pool=pool, mlp_pool=mlp_pool, features=features,
            summary=f"{map_note(net)}pool {pool[0]}x{pool[1]}, 3x conv1x1 {c}, pool {mlp_pool[0]}x{mlp_pool[1]}, "
                    f"MLP {features}-{features}-{ctx.num_classes}",
        )
        return self.measured_spec(layer, ctx, net=net)

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        return DGLAux(spec.net)

