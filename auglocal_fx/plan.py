"""The conversion plan: pure, JSON-serialisable data describing a LocalModel.

A plan says which graph nodes form each unit, where the K local layers are cut, and what every aux net is made
of (its depth, the units it copies, the shape adapters between them). It holds no modules and no tensors:
``convert`` computes it from the traced model, ``_build`` turns it into modules, and a saved artifact is a plan
plus a safetensors file. ``apply_plan`` re-traces a model and checks that the recomputed plan matches.

Example::

    plan = local_model.plan
    json.dumps(plan.to_dict())              # what auglocal.json stores
    Plan.from_dict(plan.to_dict()) == plan  # True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import PlanMismatchError

__all__ = ["Plan", "UnitSpec", "HeadSpec", "LayerSpec", "AuxSpec", "AdapterSpec", "PLAN_FORMAT_VERSION"]

PLAN_FORMAT_VERSION = 1


@dataclass
class UnitSpec:
    index: int
    name: str
    first_node: str
    last_node: str
    modules: List[str]
    flops: int  # per sample
    params: int
    in_shape: List[int]  # per sample (no batch dimension)
    out_shape: List[int]


@dataclass
class HeadSpec:
    first_node: str
    modules: List[str]
    flops: int
    params: int
    in_shape: List[int]
    out_shape: List[int]


@dataclass
class AdapterSpec:
    in_shape: List[int]
    out_shape: List[int]
    in_layout: str
    out_layout: str
    params: int
    flops: int


@dataclass
class AuxSpec:
    """One hidden layer's aux net as its rule planned it (``config["rule"]``).

    AugLocal fills ``depth``, ``units`` and ``adapters`` (the later units it copies); rules that build their aux
    net from the layer's output shape alone leave those empty and describe it in ``net``.
    """

    layer: int
    depth: int
    units: List[int]
    adapters: List[Optional[AdapterSpec]]  # adapters[j] sits in front of units[j]; None where shapes match
    params: int
    flops: int  # forward FLOPs per sample
    net: Dict[str, Any] = field(default_factory=dict)  # the rule's own description (JSON data)


@dataclass
class LayerSpec:
    index: int
    units: List[int]
    cut_after: Optional[str]  # name of the graph node after which this layer ends (None: the last layer)
    flops: int
    params: int
    out_shape: List[int]


@dataclass
class Plan:
    config: Dict[str, Any]
    trace: Dict[str, Any]
    units: List[UnitSpec]
    head: HeadSpec
    layers: List[LayerSpec]
    aux: List[AuxSpec]
    source: Optional[Dict[str, Any]] = None
    format_version: int = PLAN_FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def layer_cuts(self) -> List[str]:
        return [layer.cut_after for layer in self.layers if layer.cut_after is not None]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Plan":
        try:
            version = data.get("format_version")
            if version != PLAN_FORMAT_VERSION:
                raise PlanMismatchError(
                    f"plan format version {version!r} is not supported by this auglocal-fx (it reads version "
                    f"{PLAN_FORMAT_VERSION}); convert the model again with this version"
                )

            def aux(d: Dict[str, Any]) -> AuxSpec:
                adapters = [AdapterSpec(**a) if a is not None else None for a in d["adapters"]]
                return AuxSpec(**{**d, "adapters": adapters})

            # Plans written before rules existed are AugLocal plans.
            config = {"rule": "auglocal", "rule_options": {}, **data["config"]}
            return cls(
                config=config,
                trace=dict(data["trace"]),
                units=[UnitSpec(**u) for u in data["units"]],
                head=HeadSpec(**data["head"]),
                layers=[LayerSpec(**layer) for layer in data["layers"]],
                aux=[aux(a) for a in data["aux"]],
                source=data.get("source"),
                format_version=version,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PlanMismatchError(f"the plan is malformed or incomplete ({type(exc).__name__}: {exc})") from None

    def diff(self, other: "Plan") -> Optional[str]:
        """A readable description of the first difference in structure (config, units, layers, aux), or None."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key in ("config", "units", "head", "layers", "aux"):
            found = _first_difference(mine[key], theirs[key], key)
            if found:
                return found
        return None


def _first_difference(a: Any, b: Any, path: str) -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"
