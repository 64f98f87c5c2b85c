"""The conversion pipeline, top to bottom: trace -> shapes -> cut points -> units -> plan -> build -> LocalModel.

Example::

    import auglocal_fx, torchvision
    lm = auglocal_fx.convert(torchvision.models.resnet50(), layers=17)
    print(lm.summary())

    # A saved plan is re-applied to a freshly built model:
    lm2 = auglocal_fx.apply_plan(torchvision.models.resnet50(), lm.plan)
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._build import segment_module
from ._cuts import GraphCuts, find_cuts
from ._partition import group_units, refine_cuts
from ._shapes import ShapeFlopProp, is_tensor_meta
from ._trace import TracedModel, trace_model
from ._units import Segment, find_units, node_modules
from .errors import ConversionError, PlanMismatchError
from .local_model import LocalModel
from .plan import HeadSpec, LayerSpec, Plan, UnitSpec
from .rules import BuildContext, PlanContext, Rule, get_rule
from .schedule import validate_schedule_args
from .summary import format_table

__all__ = ["convert", "apply_plan", "inspect_model", "ModelInspection"]

_EXAMPLE_BATCH = 2  # > 1 so the batch dimension is told apart from the others
_AUX_INITS = ("copy", "fresh")


# -- analysis: trace, shapes, cuts, units -------------------------------------------------------------------
@dataclass
class _Analysis:
    model: nn.Module
    traced: TracedModel
    cuts: GraphCuts
    units: List[Segment]
    head: Segment
    input_size: Tuple[int, int, int]

    @property
    def inner_cuts(self) -> List[int]:
        return [p for p in self.cuts.valid if p < self.head.start]

    def shape(self, position: int) -> List[int]:
        value = self.cuts.crossing[position] if position < len(self.cuts.body) else self.cuts.output_value
        return list(value.meta["tensor_meta"].shape[1:])

    def flops(self, start: int, end: int) -> int:
        return sum(n.meta.get("flops", 0) for n in self.cuts.body[start:end]) // _EXAMPLE_BATCH

    def params(self, start: int, end: int) -> int:
        gm = self.traced.graph_module
        seen: Dict[int, int] = {}
        for node in self.cuts.body[start:end]:
            if node.op == "call_module":
                for p in gm.get_submodule(node.target).parameters():
                    seen[id(p)] = p.numel()
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    value = _attr(gm, arg.target)
                    if isinstance(value, nn.Parameter):
                        seen[id(value)] = value.numel()
        return sum(seen.values())


def _attr(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    return (3, 224, 224)


def _check_input_size(input_size: Any) -> Tuple[int, int, int]:
    try:
        size = tuple(int(v) for v in input_size)
        if len(size) != 3 or any(v < 1 for v in size) or any(int(v) != v for v in input_size):
            raise ValueError
    except (TypeError, ValueError):
        raise ConversionError(
            f"input_size must be three positive integers (channels, height, width), e.g. (3, 224, 224); got {input_size!r}"
        ) from None
    return size


def _analyze(model: nn.Module, *, input_size: Optional[Sequence[int]], leaf_modules: Optional[Sequence[Any]]) -> _Analysis:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    size = _check_input_size(input_size) if input_size is not None else _default_input_size(model)
    try:
        model = copy.deepcopy(model)  # the caller's model is never traced in place nor trained through
    except Exception as exc:
        raise ConversionError(f"cannot copy {type(model).__name__} ({exc}); auglocal-fx works on a deep copy") from exc
    traced = trace_model(model, leaf_modules=leaf_modules)
    gm = traced.graph_module
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    example = torch.randn((_EXAMPLE_BATCH, *size), generator=generator).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        ShapeFlopProp(gm).propagate(example)
    finally:
        model.train(was_training)
    cuts = find_cuts(gm)
    out_meta = cuts.output_value.meta.get("tensor_meta") if hasattr(cuts.output_value, "meta") else None
    if not is_tensor_meta(out_meta):
        raise ConversionError(
            f"{type(model).__name__} does not return one logits tensor in eval mode (it returns "
            f"{type(cuts.output_value).__name__ if not hasattr(cuts.output_value, 'meta') else 'a structure'}); "
            "auglocal-fx converts classifiers. Wrap the model so that forward returns the logits."
        )
    if len(out_meta.shape) != 2:
        raise ConversionError(
            f"{type(model).__name__} returns a tensor of shape {tuple(out_meta.shape)}, not (batch, classes): "
            "it has no classifier head. auglocal-fx converts image classifiers (create the model with num_classes > 0)."
        )
    units, head = find_units(model, gm, cuts)
    return _Analysis(model=model, traced=traced, cuts=cuts, units=units, head=head, input_size=size)


# -- plan ---------------------------------------------------------------------------------------------------
def _cut_position(analysis: _Analysis, name: str) -> int:
    """The cut right after a graph node or after the last node of a module."""
    body = analysis.cuts.body
    for i, node in enumerate(body):
        if node.name == name:
            return i + 1
    inside = [i for i, node in enumerate(body) if name in node_modules(node)]
    if not inside:
        raise ConversionError(
            f"cut {name!r} names no module and no graph node of the model; use a module name from "
            "model.named_modules() or a node name from `auglocal inspect`"
        )
    return inside[-1] + 1


def _resolve_cuts(analysis: _Analysis, cuts: Sequence[str]) -> List[int]:
    if isinstance(cuts, str):
        raise TypeError("cuts must be a list of names, e.g. cuts=['layer1', 'layer2', 'layer3']")
    positions = []
    valid = set(analysis.inner_cuts)
    for name in cuts:
        p = _cut_position(analysis, str(name))
        if p not in valid:
            near = sorted(valid, key=lambda v: abs(v - p))[:3]
            names = ", ".join(repr(analysis.cuts.node_name_before(v)) for v in sorted(near))
            raise ConversionError(
                f"cannot cut after {name!r}: more than one tensor crosses there, or it is in the head. "
                f"Nearby valid cuts are after {names}."
            )
        positions.append(p)
    if sorted(set(positions)) != positions:
        raise ConversionError(f"cuts must be distinct and in execution order; got {list(cuts)}")
    return positions


def _unit_spec(analysis: _Analysis, index: int, seg: Segment) -> UnitSpec:
    body = analysis.cuts.body
    return UnitSpec(
        index=index,
        name=seg.name,
        first_node=body[seg.start].name,
        last_node=body[seg.end - 1].name,
        modules=list(seg.modules),
        flops=analysis.flops(seg.start, seg.end),
        params=analysis.params(seg.start, seg.end),
        in_shape=analysis.shape(seg.start),
        out_shape=analysis.shape(seg.end),
    )


def _refined_units(analysis: _Analysis, layer_cuts: List[int]) -> List[Segment]:
    """The natural units, split further wherever a layer cut falls inside one (K > units, explicit cuts)."""
    pieces: List[Segment] = []
    for unit in analysis.units:
        inner = [c for c in layer_cuts if unit.start < c < unit.end]
        bounds = [unit.start] + inner + [unit.end]
        for j, (s, e) in enumerate(zip(bounds, bounds[1:])):
            name = unit.name if not inner else f"{unit.name}[{j}]"
            piece = Segment(s, e, name, unit.modules if not inner else _modules_in(analysis, s, e))
            pieces.append(piece)
    return pieces


def _modules_in(analysis: _Analysis, start: int, end: int) -> List[str]:
    seen: Dict[str, None] = {}
    for node in analysis.cuts.body[start:end]:
        names = node_modules(node)
        if names:
            seen.setdefault(names[-1], None)
    return list(seen)


def _make_plan(
    analysis: _Analysis,
    *,
    layers: int,
    aux_depth: int,
    pyramid: float,
    aux_init: str,
    cuts: Optional[Sequence[str]],
    leaf_modules: Optional[Sequence[Any]],
    source: Optional[Dict[str, Any]],
    rule: Rule,
    rule_options: Dict[str, Any],
) -> Plan:
    n_units = len(analysis.units)
    max_layers = len(analysis.inner_cuts) + 1
    if cuts is not None:
        layer_cuts = _resolve_cuts(analysis, cuts)
        if layers != len(layer_cuts) + 1:
            raise ConversionError(f"{len(layer_cuts)} cuts make {len(layer_cuts) + 1} layers, but layers={layers}")
    elif layers > max_layers:
        raise ConversionError(
            f"layers={layers} is more than {type(analysis.model).__name__} can be cut into at input size "
            f"{analysis.input_size}: at most {max_layers} local layers ({n_units} units, {max_layers - 1} valid cut "
            "points). Use fewer layers; `auglocal inspect MODEL` lists the cut points."
        )
    elif layers <= n_units:
        starts = group_units([analysis.flops(u.start, u.end) for u in analysis.units], layers)
        layer_cuts = [analysis.units[i].start for i in starts]
    else:
        node_flops = [n.meta.get("flops", 0) for n in analysis.cuts.body]
        unit_cuts = [u.start for u in analysis.units[1:]]
        layer_cuts = refine_cuts(unit_cuts, analysis.inner_cuts, node_flops, layers, head_start=analysis.head.start)

    pieces = _refined_units(analysis, layer_cuts)
    units = [_unit_spec(analysis, i, seg) for i, seg in enumerate(pieces)]
    head = analysis.head
    head_spec = HeadSpec(
        first_node=analysis.cuts.body[head.start].name,
        modules=list(head.modules),
        flops=analysis.flops(head.start, head.end),
        params=analysis.params(head.start, head.end),
        in_shape=analysis.shape(head.start),
        out_shape=analysis.shape(head.end),
    )

    bounds = [0] + layer_cuts + [head.start]
    layer_specs = []
    for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
        members = [u.index for u, seg in zip(units, pieces) if s <= seg.start and seg.end <= e]
        last = k == len(bounds) - 2
        end = head.end if last else e
        layer_specs.append(
            LayerSpec(
                index=k,
                units=members,
                cut_after=None if last else analysis.cuts.node_name_before(e),
                flops=analysis.flops(s, end),
                params=analysis.params(s, end),
                out_shape=analysis.shape(end),
            )
        )

    config = {
        "layers": layers,
        "aux_depth": aux_depth,
        "pyramid": float(pyramid),
        "aux_init": aux_init,
        "input_size": list(analysis.input_size),
        "cuts": list(cuts) if cuts is not None else None,
        "leaf_modules": [_leaf_name(m) for m in leaf_modules or ()],
        "rule": rule.name,
        "rule_options": dict(rule_options),
    }
    context = PlanContext(units=units, head=head_spec, layers=layer_specs, input_size=analysis.input_size,
                          config=config, options=rule_options)
    aux_specs = [rule.plan_aux(spec, context) for spec in layer_specs[:-1]]
    trace = {
        "leaf_modules": list(analysis.traced.leaf_names),
        "auto_leaves": list(analysis.traced.auto_leaves),
        "num_nodes": len(analysis.cuts.body),
    }
    return Plan(config=config, trace=trace, units=units, head=head_spec, layers=layer_specs, aux=aux_specs, source=source)


def _leaf_name(item: Any) -> str:
    return item.__name__ if isinstance(item, type) else str(item)


# -- build --------------------------------------------------------------------------------------------------
def _build(analysis: _Analysis, plan: Plan) -> LocalModel:
    model, cuts = analysis.model, analysis.cuts
    position = {node.name: i for i, node in enumerate(cuts.body)}
    unit_bounds = [(position[u.first_node], position[u.last_node] + 1) for u in plan.units]
    head_start = position[plan.head.first_node]

    layer_bounds = [0] + [position[c] + 1 for c in plan.layer_cuts] + [len(cuts.body)]
    layers = [
        segment_module(model, cuts, s, e, class_name=f"LocalLayer{k}")
        for k, (s, e) in enumerate(zip(layer_bounds, layer_bounds[1:]))
    ]
    unit_modules: Dict[int, nn.Module] = {}

    def unit_module(u: int) -> nn.Module:
        if u not in unit_modules:
            s, e = unit_bounds[u]
            unit_modules[u] = segment_module(model, cuts, s, e, class_name=f"AuxUnit{u}")
        return unit_modules[u]

    head_module = functools.lru_cache(maxsize=None)(
        lambda: segment_module(model, cuts, head_start, len(cuts.body), class_name="Head"))
    context = BuildContext(unit_module=unit_module, head_module=head_module, fresh=plan.config["aux_init"] == "fresh")
    rule = get_rule(plan.config["rule"])
    aux = [rule.build_aux(spec, context) for spec in plan.aux]
    local = LocalModel(layers, aux, plan, model)
    local.train(model.training)
    param = next(model.parameters(), None)
    if param is not None:
        local.aux.to(device=param.device)
    return local


# -- public API ---------------------------------------------------------------------------------------------
def _check_options(layers: Any, aux_depth: Any, pyramid: Any, aux_init: Any, rule: Any,
                   rule_options: Any) -> Tuple[Rule, Dict[str, Any]]:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConversionError(f"layers must be an integer >= 1 (the number of local layers K), got {layers!r}")
    try:
        validate_schedule_args(aux_depth=aux_depth, pyramid=pyramid)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if aux_init not in _AUX_INITS:
        raise ConversionError(f"aux_init must be one of {', '.join(_AUX_INITS)} (copy the units' weights or re-initialise them), got {aux_init!r}")
    resolved = get_rule(rule)
    if rule_options is not None and not isinstance(rule_options, Mapping):
        raise ConversionError(f"rule_options must be a mapping of option names to values, got {rule_options!r}")
    return resolved, resolved.resolve_options(rule_options)


def convert(
    model: nn.Module,
    *,
    layers: int,
    aux_depth: int = 2,
    pyramid: float = 0.5,
    aux_init: str = "copy",
    input_size: Optional[Sequence[int]] = None,
    cuts: Optional[Sequence[str]] = None,
    leaf_modules: Optional[Sequence[Any]] = None,
    source: Optional[Dict[str, Any]] = None,
    rule: str = "auglocal",
    rule_options: Optional[Mapping[str, Any]] = None,
) -> LocalModel:
    """Turn an image classifier into a :class:`LocalModel` trained with a local-learning rule (AugLocal by default).

    Args:
        model: any torch.fx-traceable classifier (timm, torchvision, your own). It is deep-copied: the caller's
            object is never changed, and the LocalModel's layers share parameters with its private copy.
        layers: K, the number of local layers. Equal to the number of units: one unit per layer; fewer: units
            grouped by FLOPs; more: extra cuts inside units.
        aux_depth: d, the number of later units copied into each aux net (before the pyramid shrinks it).
        pyramid: tau in [0, 1]; the depth of layer i's aux net is ``max(1, round(d*(1-i*tau/(K-2)) + i*tau/(K-2)))``.
        aux_init: ``"copy"`` the selected units' weights into the aux nets, or ``"fresh"`` re-initialise them.
        input_size: (C, H, W) of the example input used for shapes and FLOPs; timm's ``pretrained_cfg`` when
            the model has one, else (3, 224, 224).
        cuts: explicit layer boundaries, as module or graph-node names (the cut is placed right after each).
        leaf_modules: module classes, class names or qualified module names that tracing must keep whole.
        source: JSON-able description of how to rebuild ``model`` (for saving); defaults to what
            ``auglocal_fx.create_model`` recorded on the model.
        rule: the local-learning rule that builds the aux nets and their losses: ``"auglocal"``, ``"dgl"``,
            ``"predsim"``, ``"infopro"``, ``"greedy"`` or one added with :func:`auglocal_fx.register_rule`.
            ``aux_depth``, ``pyramid`` and ``aux_init`` are AugLocal's settings; the other rules build fresh aux
            nets from the shape of each layer's output.
        rule_options: the rule's own options (e.g. the loss weights ``x1, x2, y1, y2``); the rest keep their
            defaults (``auglocal_fx.get_rule(name).options``).
    """
    rule_impl, options = _check_options(layers, aux_depth, pyramid, aux_init, rule, rule_options)
    analysis = _analyze(model, input_size=input_size, leaf_modules=leaf_modules)
    source = source if source is not None else copy.deepcopy(getattr(model, "_auglocal_source", None))
    plan = _make_plan(
        analysis,
        layers=layers,
        aux_depth=aux_depth,
        pyramid=pyramid,
        aux_init=aux_init,
        cuts=cuts,
        leaf_modules=leaf_modules,
        source=source,
        rule=rule_impl,
        rule_options=options,
    )
    return _build(analysis, plan)


def apply_plan(model: nn.Module, plan: Plan) -> LocalModel:
    """Re-trace ``model`` and rebuild the LocalModel a saved ``plan`` describes; refuse if they do not match."""
    config = plan.config
    leaves = list(config.get("leaf_modules") or []) + list(plan.trace.get("leaf_modules") or [])
    analysis = _analyze(model, input_size=config["input_size"], leaf_modules=leaves or None)
    rebuilt = _make_plan(
        analysis,
        layers=config["layers"],
        aux_depth=config["aux_depth"],
        pyramid=config["pyramid"],
        aux_init=config["aux_init"],
        cuts=plan.layer_cuts,
        leaf_modules=None,
        source=plan.source,
        rule=get_rule(config["rule"]),
        rule_options=dict(config["rule_options"]),
    )
    rebuilt.config = {**rebuilt.config, "cuts": config.get("cuts"), "leaf_modules": config.get("leaf_modules", [])}
    difference = plan.diff(rebuilt)
    if difference:
        raise PlanMismatchError(
            f"the saved plan does not match {type(model).__name__} as traced now ({difference}); it was made for "
            "another architecture, input size or library version. Convert the model again."
        )
    return _build(analysis, plan)


@dataclass
class ModelInspection:
    """What `auglocal inspect` shows: units, cut points, head and the largest K, without converting."""

    model_name: str
    input_size: Tuple[int, int, int]
    units: List[Dict[str, Any]]
    valid_cuts: List[str]
    head: Dict[str, Any]
    max_layers: int
    leaf_modules_added: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def summary(self) -> str:
        rows = [{k: u[k] for k in ("index", "name", "params", "flops", "in_shape", "out_shape")} for u in self.units]
        title = (
            f"{self.model_name} at {self.input_size}: {len(self.units)} units, {len(self.valid_cuts)} valid cut points, "
            f"largest K = {self.max_layers}"
        )
        text = format_table(rows, title=title)
        head = self.head
        text += f"\nhead: {', '.join(head['modules'])} ({head['params']} params, in {head['in_shape']})"
        if self.leaf_modules_added:
            text += f"\nmodules made leaves to trace: {', '.join(self.leaf_modules_added)}"
        return text


def inspect_model(
    model: nn.Module, *, input_size: Optional[Sequence[int]] = None, leaf_modules: Optional[Sequence[Any]] = None
) -> ModelInspection:
    """Trace ``model`` and report its units, every valid cut point, its head and the largest possible K."""
    analysis = _analyze(model, input_size=input_size, leaf_modules=leaf_modules)
    units = [_unit_spec(analysis, i, u).__dict__ for i, u in enumerate(analysis.units)]
    head = analysis.head
    return ModelInspection(
        model_name=type(model).__name__,
        input_size=analysis.input_size,
        units=units,
        valid_cuts=[analysis.cuts.node_name_before(p) for p in analysis.inner_cuts],
        head={
            "first_node": analysis.cuts.body[head.start].name,
            "modules": list(head.modules),
            "params": analysis.params(head.start, head.end),
            "flops": analysis.flops(head.start, head.end),
            "in_shape": analysis.shape(head.start),
        },
        max_layers=len(analysis.inner_cuts) + 1,
        leaf_modules_added=list(analysis.traced.auto_leaves),
    )
