"""InfoPro (Wang, Ni, Song, Yang and Huang, ICLR 2021), the cross-entropy variant the AugLocal reference harness
compares against: each hidden layer keeps information about the input (a reconstruction loss) and about the label
(a small classifier).

On a layer output read as a ``C x H x W`` map (:mod:`._maps`):

* classifier: 3x3 conv (no bias) to ``C'`` channels with stride ``s``, BatchNorm2d, ReLU, global average pool,
  Linear ``C'->128``, ReLU, Linear ``128->classes``; cross-entropy. ``C'`` and ``s`` come from the plan's real
  shapes: the width of the first later unit whose map has fewer positions (the next stage) and stride 2 while
  there is one; the layer's own width and stride 1 in the last stage (or in a model that never downsamples, such
  as a ViT). The reference reads them from a CIFAR-ResNet table (16->32, 32->64 with stride 2; 64->64).
* decoder: bilinear upsampling of the map (``align_corners=True``) to the input's resolution, 3x3 conv
  ``C->12`` with bias, BatchNorm2d, ReLU, 3x3 conv ``12->input channels`` with bias, sigmoid; binary
  cross-entropy against the network's input with its normalisation undone, ``x*std + mean`` clamped to [0, 1]
  (the same augmented crop the network saw). The sigmoid is folded into the loss
  (``binary_cross_entropy_with_logits``) and the loss is computed in float32 with autocast off: BCE on
  probabilities is refused under autocast and loses precision in float16.
* loss: ``lambda_x * reconstruction + lambda_y * cross-entropy``; the defaults are the reference's ResNet-32 K=16
  setting, ``x1=5, y1=0.05, x2=0.2, y2=0.5`` (ResNet-110 K=55: ``x1=5, y1=0, x2=0.5, y2=1``).

The decoder needs the network's input and its normalisation: ``lm.local_step(x, y, mean=..., std=...)`` (the
trainers pass the data pipeline's). Above 64 px the decoder is InfoPro's ImageNet one instead (option ``decoder``:
``auto``, ``upsample`` or ``progressive``): a 1x1 conv to 128 channels, then up to three x2 upsampling steps with
3x3 convs to 32 and 12 channels, compared with the input resized to its resolution; upsampling a deep map to
the input's full resolution first would not fit in memory at ImageNet sizes. The contrastive variant is not
implemented.

Example: ResNet-32's first layer, ``16 x 32 x 32`` with 10 classes: classifier
``16*32*9 + 2*32 + (32*128 + 128) + (128*10 + 10) = 10186``, decoder ``(16*12*9 + 12) + 2*12 + (12*3*9 + 3) = 2091``::

    lm = auglocal_fx.convert(model, layers=16, rule="infopro", input_size=(3, 32, 32))
    lm.local_step(images, labels, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConversionError
from ..plan import AuxSpec, LayerSpec
from ._base import BuildContext, LossContext, PlanContext, Rule, count_module, register_rule
from ._maps import feature_map, map_note, later_downsampling, reference_init, to_map

__all__ = ["InfoPro", "InfoProAux"]

_HIDDEN = 128  # the classifier's hidden width (the reference's aux_net_feature_dim)
_DECODER_WIDTH = 12
_PROGRESSIVE_WIDTHS = (128, 32, 12)  # InfoPro's ImageNet decoder
_DECODERS = ("auto", "upsample", "progressive")
_AUTO_PROGRESSIVE_ABOVE = 64  # input side (px) above which "auto" picks the progressive decoder


def _upsamplings(decoder: str, map_h: int, input_size) -> int:
    """0 for the one-jump decoder; else the number of x2 steps (1..3) towards the input's resolution."""
    progressive = decoder == "progressive" or (decoder == "auto" and max(input_size[1:]) > _AUTO_PROGRESSIVE_ABOVE)
    if not progressive:
        return 0
    ratio = max(input_size[1] / max(map_h, 1), 1.0)
    return int(min(3, max(1, math.ceil(math.log2(ratio)))))


class InfoProAux(nn.Module):
    """InfoPro's classifier and decoder from an ``AuxSpec.net``; ``forward(h)`` returns the classifier's logits."""

    def __init__(self, net: Dict[str, Any]):
        super().__init__()
        c = net["map"][0]
        width, stride = net["conv_width"], net["conv_stride"]
        self.to_map = to_map(net)
        self.head = nn.Sequential(
            nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, _HIDDEN), nn.ReLU(), nn.Linear(_HIDDEN, net["classes"]),
        )
        self.upsamplings = int(net.get("upsamplings", 0))
        out_channels = net["input_size"][0]
        # Both end with logits: the sigmoid is part of the loss (binary_cross_entropy_with_logits).
        if self.upsamplings == 0:  # the reference's CIFAR decoder: one jump to the input resolution
            self.decoder = nn.Sequential(
                nn.Conv2d(c, _DECODER_WIDTH, 3, padding=1), nn.BatchNorm2d(_DECODER_WIDTH), nn.ReLU(),
                nn.Conv2d(_DECODER_WIDTH, out_channels, 3, padding=1),
            )
        else:  # InfoPro's ImageNet decoder: 1x1 to 128 channels, then x2 upsampling steps (128 -> 32 -> 12)
            steps: List[nn.Module] = [nn.Conv2d(c, _PROGRESSIVE_WIDTHS[0], 1, bias=False),
                                      nn.BatchNorm2d(_PROGRESSIVE_WIDTHS[0]), nn.ReLU()]
            widths = _PROGRESSIVE_WIDTHS[: self.upsamplings + 1]
            for c_in, c_out in zip(widths, widths[1:]):
                steps += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                          nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            steps += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)] * (
                self.upsamplings - len(widths) + 1)
            steps.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1, bias=False))
            self.decoder = nn.Sequential(*steps)
        reference_init(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.to_map(h))

    def reconstruct(self, h: torch.Tensor, size) -> torch.Tensor:
        """The decoder's logits of the input image; ``sigmoid`` gives the image. The one-jump decoder works at
        ``size`` (H, W); the progressive one at the map's resolution times ``2**upsamplings``."""
        x = self.to_map(h)
        if self.upsamplings == 0:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.decoder(x)


@register_rule
class InfoPro(Rule):
    name = "infopro"
    description = "InfoPro (Wang et al., 2021), cross-entropy variant: conv-MLP classifier + image reconstruction"
    options = {"x1": 5.0, "x2": 0.2, "y1": 0.05, "y2": 0.5, "decoder": "auto"}
    needs_input = True

    def resolve_options(self, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        resolved = super().resolve_options(given)
        if resolved["decoder"] not in _DECODERS:
            raise ConversionError(f"rule 'infopro' option 'decoder' must be one of {', '.join(_DECODERS)}, got "
                                  f"{resolved['decoder']!r}")
        return resolved

    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        net = feature_map(layer.out_shape, ctx.aspect)
        c, map_h = net["map"][0], net["map"][1]
        following = later_downsampling(layer, ctx, net["map"])
        width, stride = (following[0], 2) if following is not None else (c, 1)
        upsamplings = _upsamplings(ctx.options.get("decoder", "auto"), map_h, ctx.input_size)
        decoder = (f"decoder {c}-{_DECODER_WIDTH}-{ctx.input_size[0]}" if upsamplings == 0 else
                   f"decoder {c}-{'-'.join(map(str, _PROGRESSIVE_WIDTHS[:upsamplings + 1]))}-{ctx.input_size[0]}, "
                   f"x{2 ** upsamplings}")
        net.update(
            classes=ctx.num_classes, conv_width=width, conv_stride=stride, input_size=list(ctx.input_size),
            upsamplings=upsamplings,
            summary=f"{map_note(net)}conv3x3 {c}->{width}/{stride}, MLP {width}-{_HIDDEN}-{ctx.num_classes}; "
                    + decoder,
        )
        spec = self.measured_spec(layer, ctx, net=net)
        # forward() runs the classifier only: add the decoder's FLOPs (at the input's resolution for the one-jump
        # decoder, from the map's for the progressive one).
        decoder_input = [c, *ctx.input_size[1:]] if upsamplings == 0 else list(net["map"])
        _, decoder_flops = count_module(lambda: InfoProAux(net).decoder, decoder_input)
        spec.flops += decoder_flops
        return spec

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        return InfoProAux(spec.net)

    def loss(self, aux: nn.Module, h: torch.Tensor, target: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        image = _restored_input(ctx)
        cross_entropy = ctx.loss_fn(aux(h), target)
        logits = aux.reconstruct(h, image.shape[-2:])
        if logits.shape[-2:] != image.shape[-2:]:  # the progressive decoder's resolution: compare at its size
            image = F.interpolate(image, size=logits.shape[-2:], mode="area")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            reconstruction = F.binary_cross_entropy_with_logits(logits.float(), image)
        weight_rec, weight_ce = self.weights(ctx)
        return weight_rec * reconstruction + weight_ce * cross_entropy


def _restored_input(ctx: LossContext) -> torch.Tensor:
    """The network's input with its normalisation undone, in [0, 1], float32: the decoder's target."""
    if ctx.inputs is None:
        raise ConversionError("the infopro rule reconstructs the network's input: train with lm.local_step(x, y, "
                              "mean=..., std=...) or pass inputs= to train_layer")
    if ctx.mean is None or ctx.std is None:
        raise ConversionError("the infopro rule needs the input normalisation: pass mean= and std= to local_step "
                              "(or set them in the data pipeline), e.g. mean=(0.485, 0.456, 0.406), "
                              "std=(0.229, 0.224, 0.225)")
    x = ctx.inputs.detach().float()
    mean = torch.as_tensor(ctx.mean, dtype=torch.float32, device=x.device).flatten()
    std = torch.as_tensor(ctx.std, dtype=torch.float32, device=x.device).flatten()
    if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
        raise ConversionError(f"mean and std must have 1 or {x.shape[1]} values (one per input channel), got "
                              f"{mean.numel()} and {std.numel()}")
    # Clamped: augmentations such as random erasing can leave values outside what BCE takes as a target.
    return (x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp_(0, 1)
