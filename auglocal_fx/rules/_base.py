"""The local-learning rule interface and its registry.

A *rule* is the one place that knows how a hidden layer's aux net looks and how its local loss is computed.
It works in three steps, matching the conversion pipeline's plan/build split:

1. ``plan_aux(layer, ctx)``: pure data. From the plan so far (units, head, layer shapes) it describes the aux
   net of one hidden layer as an :class:`~auglocal_fx.plan.AuxSpec`, with its parameter and FLOP counts.
2. ``build_aux(spec, ctx)``: the ``nn.Module`` for that spec. Its ``forward(h)`` returns class logits (the
   layer-wise accuracy reads them); extra branches (a decoder, a similarity head) are attributes the loss uses.
3. ``loss(aux, h, target, ctx)``: layer k's local loss from its output ``h``.

Rules live in a registry, like timm's model families, so a user can add one::

    @auglocal_fx.register_rule
    class LinearProbe(auglocal_fx.rules.Rule):
        name = "linear_probe"

        def plan_aux(self, layer, ctx):
            return self.measured_spec(layer, ctx, net={"in_shape": layer.out_shape, "classes": ctx.num_classes})

        def build_aux(self, spec, ctx):
            c = spec.net["in_shape"][0]
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, spec.net["classes"]))

    lm = auglocal_fx.convert(model, layers=4, rule="linear_probe")
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConversionError
from ..plan import AuxSpec, HeadSpec, LayerSpec, UnitSpec

__all__ = [
    "Rule", "PlanContext", "BuildContext", "LossContext", "register_rule", "get_rule", "list_rules",
    "loss_weights", "count_module", "DEFAULT_RULE",
]

DEFAULT_RULE = "auglocal"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- contexts ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanContext:
    """What a rule may read when it plans the aux net of one hidden layer (all pure data)."""

    units: Sequence[UnitSpec]
    head: HeadSpec
    layers: Sequence[LayerSpec]
    input_size: Tuple[int, int, int]
    config: Mapping[str, Any]  # convert's options (aux_depth, pyramid, aux_init, ...)
    options: Mapping[str, Any]  # this rule's resolved options

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_classes(self) -> int:
        return int(self.head.out_shape[-1])

    @property
    def aspect(self) -> float:
        """The input image's H/W, used to tell (C, H, W) from (H, W, C)."""
        return self.input_size[1] / self.input_size[2]


@dataclass(frozen=True)
class BuildContext:
    """What a rule may use to build an aux net: modules cut from the traced model, for rules that copy them."""

    unit_module: Callable[[int], nn.Module]
    head_module: Callable[[], nn.Module]
    fresh: bool  # aux_init == "fresh": re-initialise copied modules


@dataclass
class LossContext:
    """Per-step inputs of a local loss beyond the layer's output and the target."""

    layer: int
    num_layers: int
    loss_fn: LossFn = F.cross_entropy
    options: Mapping[str, Any] = field(default_factory=dict)
    inputs: Optional[torch.Tensor] = None  # the network's (normalised) input, for rules with needs_input
    mean: Optional[Sequence[float]] = None  # the input normalisation, for rules that undo it
    std: Optional[Sequence[float]] = None


def loss_weights(layer: int, num_layers: int, x: Tuple[float, float], y: Tuple[float, float]) -> Tuple[float, float]:
    """The reference's per-layer weights of the extra loss and of cross-entropy, interpolated over depth.

    ``r = i/(K-2)`` (0 when K <= 2); ``lambda_x = x1*(1-r) + x2*r``, ``lambda_y = y1*(1-r) + y2*r``::

        >>> loss_weights(0, 16, (5, 0.2), (0.05, 0.5)), loss_weights(14, 16, (5, 0.2), (0.05, 0.5))
        ((5.0, 0.05), (0.2, 0.5))
    """
    r = layer / (num_layers - 2) if num_layers > 2 else 0.0
    return (float(x[0]) * (1 - r) + float(x[1]) * r, float(y[0]) * (1 - r) + float(y[1]) * r)


# -- the rule ------------------------------------------------------------------------------------------------
class Rule:
    """Base class of local-learning rules. Subclasses set ``name`` and ``options`` and implement the three steps.

    ``options`` maps each option's name to its default; :meth:`resolve_options` fills and checks them. Options
    named ``x1, x2, y1, y2`` are the reference's loss-weight interpolation (see :func:`loss_weights`).
    """

    name: str = ""
    description: str = ""
    options: Mapping[str, Any] = {}
    needs_input: bool = False  # the loss reads the network's input image (it travels with the activations)

    # -- options -----------------------------------------------------------------------------------------
    def resolve_options(self, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The defaults updated with ``given``; refuses unknown names and values of the wrong type."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise ConversionError(
                f"rule {self.name!r} has no option {unknown[0]!r}; its options are: {accepted}")
        resolved = dict(self.options)
        for key, value in given.items():
            default = self.options[key]
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                value = type(default)(value) if ok and isinstance(default, float) else value
            else:
                ok = isinstance(value, type(default)) if default is not None else True
            if not ok:
                raise ConversionError(
                    f"rule {self.name!r} option {key!r} must be {type(default).__name__} like its default "
                    f"{default!r}, got {value!r}")
            resolved[key] = value
        return resolved

    def weights(self, ctx: LossContext) -> Tuple[float, float]:
        """(lambda_x, lambda_y) of layer ``ctx.layer`` from the options ``x1, x2, y1, y2``; a rule without ``x``
        options has no extra loss (0), one without ``y`` options weighs cross-entropy 1."""
        o = ctx.options
        return loss_weights(ctx.layer, ctx.num_layers, (o.get("x1", 0.0), o.get("x2", 0.0)),
                            (o.get("y1", 1.0), o.get("y2", 1.0)))

    # -- the three steps ---------------------------------------------------------------------------------
    def plan_aux(self, layer: LayerSpec, ctx: PlanContext) -> AuxSpec:
        raise NotImplementedError

    def build_aux(self, spec: AuxSpec, ctx: Optional[BuildContext]) -> nn.Module:
        raise NotImplementedError

    def loss(self, aux: nn.Module, h: torch.Tensor, target: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        """Default: cross-entropy (``ctx.loss_fn``) on the aux net's logits, weighted by ``lambda_y``."""
        _, weight_ce = self.weights(ctx)
        loss = ctx.loss_fn(aux(h), target)
        return loss if weight_ce == 1.0 else weight_ce * loss

    def describe(self, spec: AuxSpec) -> str:
        """One short line for summaries: what the aux net is made of."""
        return str(spec.net.get("summary", self.name))

    # -- helpers for rules that build from shapes alone ---------------------------------------------------
    def measured_spec(self, layer: LayerSpec, ctx: PlanContext, *, net: Dict[str, Any], depth: int = 0) -> AuxSpec:
        """An AuxSpec whose params and FLOPs are counted on a meta-device build of ``net`` (nothing allocated)."""
        spec = AuxSpec(layer=layer.index, depth=depth, units=[], adapters=[], params=0, flops=0, net=net)
        params, flops = count_module(lambda: self.build_aux(spec, None), list(layer.out_shape))
        return dataclasses.replace(spec, params=params, flops=flops)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def count_module(factory: Callable[[], nn.Module], in_shape: List[int]) -> Tuple[int, int]:
    """(parameters, forward FLOPs per sample) of the module ``factory()`` builds, on the meta device."""
    from .._shapes import total_flop_counter

    with torch.device("meta"):
        module = factory().eval()
        counter = total_flop_counter()
        with counter, torch.no_grad():
            module(torch.empty(1, *in_shape))
    return sum(p.numel() for p in module.parameters()), int(counter.get_total_flops())


# -- registry ------------------------------------------------------------------------------------------------
_RULES: Dict[str, Rule] = {}


def register_rule(rule: Union[Type[Rule], Rule]) -> Union[Type[Rule], Rule]:
    """Class decorator (or call with an instance): make a rule available as ``convert(..., rule=NAME)``."""
    instance = rule() if isinstance(rule, type) else rule
    if not isinstance(instance, Rule):
        raise TypeError(f"register_rule expects a Rule subclass or instance, got {rule!r}")
    name = instance.name
    if not name or not name.isidentifier() or name == "bp":
        raise ValueError(f"a rule needs a name that is a Python identifier other than 'bp', got {name!r}")
    _RULES[name] = instance
    return rule


def list_rules() -> List[str]:
    """Names of the registered rules, AugLocal first."""
    return sorted(_RULES, key=lambda n: (n != DEFAULT_RULE, n))


def get_rule(name: Any) -> Rule:
    """The registered rule called ``name``; a one-line error naming the accepted names otherwise."""
    rule = _RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ConversionError(f"unknown rule {name!r}; accepted rules: {', '.join(list_rules())}")
    return rule
