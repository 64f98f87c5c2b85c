"""Greedy supervised learning ("greedy SL" in InfoPro's tables): the simplest local-learning baseline.

The aux net of every hidden layer is global average pooling and one Linear layer to the classes; the loss is
cross-entropy alone, scaled by ``lambda_y`` (options ``y1``, ``y2``, both 1). Token outputs, NHWC outputs and
vectors are first read as a ``C x H x W`` map (:mod:`._maps`), so the pooling averages the patch grid (with the
class token's readout added) or the ``H x W`` positions.

Example: a ``64 x 8 x 8`` output with 10 classes gets ``64*10 + 10 = 650`` parameters::

    lm = auglocal_fx.convert(model, layers=16, rule="greedy", input_size=(3, 32, 32))
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..plan import AuxSpec, LayerSpec
from ._base import BuildContext, PlanContext, Rule, register_rule
from ._maps import feature_map, map_note, to_map

__all__ = ["Greedy"]


@register_rule
class Greedy(Rule):
    name = "greedy"
    description = "greedy supervised learning: global average pooling and a linear classifier; CE"
    options = {"y1": 1.0, "y2": 1.0}

    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        net = feature_map(layer.out_shape, ctx.aspect)
        net.update(classes=ctx.num_classes, summary=f"{map_note(net)}GAP, linear {net['map'][0]}->{ctx.num_classes}")
        return self.measured_spec(layer, ctx, net=net)

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        net = spec.net
        return nn.Sequential(to_map(net), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(net["map"][0], net["classes"]))

