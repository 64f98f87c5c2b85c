"""AugLocal (Ma et al., ICLR 2024): aux nets made of uniformly selected later units of the model, plus its head.

The aux net of the layer ending at unit ``l`` copies ``d_l`` later units chosen uniformly up to the last one
(:func:`~auglocal_fx.schedule.select_aux_units`), with ``d_l`` shrinking linearly over depth
(:func:`~auglocal_fx.schedule.depth_schedule`), then the model's own head. Where the output of one piece does
not have the shape the next piece takes (a unit skipped over a downsampling), a :class:`ShapeAdapter` sits in
between. The loss is the task's cross-entropy alone.

Example: torchvision ResNet-50, K=17, d=2, tau=0.5. Layer 0 ends at the stem (unit 0); its aux net copies
units 8 and 16 (``select_aux_units(0, 17, 2)``), each behind an adapter where the shapes differ, then the head::

    lm = auglocal_fx.convert(torchvision.models.resnet50(), layers=17)   # rule="auglocal" is the default
    lm.plan.aux[0].units                                                 # [8, 16]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .._adapters import ShapeAdapter, infer_layout
from .._build import AuxNet, copy_module
from .._shapes import total_flop_counter
from ..plan import AdapterSpec, AuxSpec, LayerSpec
from ..schedule import depth_schedule, select_aux_units
from ._base import BuildContext, PlanContext, Rule, register_rule

__all__ = ["AugLocal"]


@register_rule
class AugLocal(Rule):
    name = "auglocal"
    description = "uniformly selected later units of the model plus its head, pyramidal depth (Ma et al., 2024)"
    options = {}  # its settings are convert's aux_depth, pyramid and aux_init

    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        c = ctx.config
        depth = depth_schedule(ctx.num_layers, c["aux_depth"], c["pyramid"])[layer.index]
        units = ctx.units
        end_unit = layer.units[-1]
        selected = select_aux_units(end_unit, len(units), depth)
        adapters: List[Optional[AdapterSpec]] = []
        current = units[end_unit].out_shape
        for u in selected:
            needed = units[u].in_shape
            adapters.append(None if current == needed else adapter_spec(current, needed, ctx.aspect))
            current = units[u].out_shape
        return AuxSpec(
            layer=layer.index,
            depth=depth,
            units=selected,
            adapters=adapters,
            params=sum(units[u].params for u in selected) + sum(a.params for a in adapters if a) + ctx.head.params,
            flops=sum(units[u].flops for u in selected) + sum(a.flops for a in adapters if a) + ctx.head.flops,
        )

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        if ctx is None:
            raise ValueError("AugLocal's aux nets copy modules of the traced model: build them through convert()")
        return AuxNet(
            [copy_module(ctx.unit_module(u), fresh=ctx.fresh) for u in spec.units],
            spec.adapters,
            copy_module(ctx.head_module(), fresh=ctx.fresh),
        )

    def describe(self, spec: AuxSpec) -> str:
        return f"{len(spec.units)} later unit(s) + head"


def adapter_spec(in_shape: List[int], out_shape: List[int], aspect: float) -> AdapterSpec:
    """The adapter from ``in_shape`` to ``out_shape`` as plan data, with its parameter and FLOP counts."""
    # Building the adapter on the meta device to count its FLOPs costs ~15 ms and a resnet50 K=17 plan asks for
    # 32 adapters of 6 shapes: memoised on the (hashable) shapes; each caller gets its own copy.
    spec = _cached_adapter_spec(tuple(in_shape), tuple(out_shape), float(aspect))
    return dataclasses.replace(spec, in_shape=list(spec.in_shape), out_shape=list(spec.out_shape))


@functools.lru_cache(maxsize=256)
def _cached_adapter_spec(in_shape: Tuple[int, ...], out_shape: Tuple[int, ...], aspect: float) -> AdapterSpec:
    in_layout, out_layout = infer_layout(in_shape, aspect), infer_layout(out_shape, aspect)
    with torch.device("meta"):
        adapter = ShapeAdapter(in_shape, out_shape, in_layout, out_layout)
        counter = total_flop_counter()
        with counter:
            adapter.eval()(torch.empty(1, *in_shape))
    return AdapterSpec(
        in_shape=list(in_shape),
        out_shape=list(out_shape),
        in_layout=in_layout,
        out_layout=out_layout,
        params=sum(p.numel() for p in adapter.parameters()),
        flops=int(counter.get_total_flops()),
    )
