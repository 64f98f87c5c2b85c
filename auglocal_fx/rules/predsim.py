"""PredSim (Nokland and Eidnes, ICML 2019): a prediction loss and a similarity-matching loss per hidden layer,
as the AugLocal reference harness runs it.

On a layer output read as a ``C x H x W`` map (:mod:`._maps`):

* prediction: average pooling whose kernel doubles in height, then width, alternately (each only while it is
  smaller than its side) until ``C*h'*w' <= dim_in_decoder`` (512, the harness's value; the original's default is
  4096), stride = kernel, padding ``k*(ceil(H/k) - H//k)//2`` so sizes that do not divide are covered; flatten;
  Linear to the classes; cross-entropy. ``aux(h)`` returns these logits.
* similarity: a 3x3 conv ``C->C`` (stride 1, padding 1, no bias); each sample reduced to a vector (the standard
  deviation of each channel over space when ``C > 3`` and ``H > 1``, else the flattened map); minus its mean;
  L2-normalised (``x / (1e-8 + |x|)``); the ``B x B`` cosine matrix clamped to [-1, 1]. The target is the same
  matrix of the one-hot labels (or of soft labels, e.g. from mixup). Loss: mean squared error.
* loss: ``lambda_x * similarity + lambda_y * prediction`` with ``x1 = x2 = 0.99``, ``y1 = y2 = 0.01``.

The original trains each layer with its own Adam (lr 5e-4) and zero-initialises the prediction layer; the
harness uses one SGD over everything, PyTorch's default init of the Linear and ``N(0, sqrt(2/(9C)))`` for the
conv, as here. The similarity
matrices are computed in float32 (a sum of squares overflows float16).

Example: a ``16 x 32 x 32`` output: kernel 8x4 (pooled 4x8, 512 features), ``512*10 + 10`` prediction and
``16*16*9`` similarity parameters::

    lm = auglocal_fx.convert(model, layers=16, rule="predsim", input_size=(3, 32, 32))
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..plan import AuxSpec, LayerSpec
from ._base import BuildContext, LossContext, PlanContext, Rule, count_module, register_rule
from ._maps import feature_map, map_note, reference_init, to_map

__all__ = ["PredSim", "PredSimAux", "pool_kernel", "similarity_matrix"]


def pool_kernel(c: int, h: int, w: int, target: int) -> Tuple[List[int], List[int], List[int]]:
    """(kernel, padding, pooled size) of the prediction branch's average pooling (the reference's search).

    >>> pool_kernel(16, 32, 32, 512), pool_kernel(64, 5, 5, 512)
    (([8, 4], [0, 0], [4, 8]), ([4, 2], [2, 1], [2, 3]))
    """
    kh = kw = 1
    oh, ow = h, w
    while c * oh * ow > target and (kh < h or kw < w):
        if kh < h:
            kh *= 2
            oh = math.ceil(h / kh)
        if c * oh * ow > target and kw < w:
            kw *= 2
            ow = math.ceil(w / kw)
    padding = [kh * (oh - h // kh) // 2, kw * (ow - w // kw) // 2]
    # What AvgPool2d really yields with that padding (= oh, ow); computed, not assumed.
    pooled = [(h + 2 * padding[0] - kh) // kh + 1, (w + 2 * padding[1] - kw) // kw + 1]
    return [kh, kw], padding, pooled


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """The B x B adjusted cosine similarity of PredSim (``similarity_matrix`` of its code), in float32."""
    x = x.float()
    if x.dim() == 4 and x.size(1) > 3 and x.size(2) > 1:
        x = x.flatten(2).std(dim=2)
    else:
        x = x.flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.t()).clamp(-1, 1)


class PredSimAux(nn.Module):
    """PredSim's two branches from an ``AuxSpec.net``; ``forward(h)`` returns the prediction branch's logits."""

    def __init__(self, net: Dict[str, Any]):
        super().__init__()
        c = net["map"][0]
        kernel, padding = tuple(net["kernel"]), tuple(net["padding"])
        pool = nn.AvgPool2d(kernel, padding=padding) if kernel != (1, 1) else nn.Identity()
        self.to_map = to_map(net)
        self.pred = nn.Sequential(pool, nn.Flatten(), nn.Linear(net["features"], net["classes"]))
        self.sim = nn.Conv2d(c, c, 3, padding=1, bias=False)
        reference_init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pred(self.to_map(h))


@register_rule
class PredSim(Rule):
    name = "predsim"
    description = "PredSim (Nokland & Eidnes, 2019): pooled linear prediction + 3x3-conv similarity matching"
    options = {"x1": 0.99, "x2": 0.99, "y1": 0.01, "y2": 0.01, "dim_in_decoder": 512}

    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        net = feature_map(layer.out_shape, ctx.aspect)
        c, h, w = net["map"]
        kernel, padding, pooled = pool_kernel(c, h, w, int(ctx.options["dim_in_decoder"]))
        features = c * pooled[0] * pooled[1]
        net.update(
            classes=ctx.num_classes, kernel=kernel, padding=padding, pooled=pooled, features=features,
            summary=f"{map_note(net)}pool {kernel[0]}x{kernel[1]}, linear {features}->{ctx.num_classes}; sim conv3x3 {c}",
        )
        spec = self.measured_spec(layer, ctx, net=net)
        # forward() runs the prediction branch only: add the similarity conv's FLOPs.
        _, sim_flops = count_module(lambda: PredSimAux(net).sim, net["map"])
        spec.flops += sim_flops
        return spec

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        return PredSimAux(spec.net)

    def loss(self, aux: nn.Module, h: torch.Tensor, target: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        x = aux.to_map(h)
        prediction = ctx.loss_fn(aux.pred(x), target)
        labels = target if target.is_floating_point() else F.one_hot(target, aux.pred[-1].out_features)
        similarity = F.mse_loss(similarity_matrix(aux.sim(x)), similarity_matrix(labels).detach())
        weight_sim, weight_pred = self.weights(ctx)
        return weight_sim * similarity + weight_pred * prediction
