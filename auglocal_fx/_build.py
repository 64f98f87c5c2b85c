"""Step 7 of the pipeline: build modules from a plan.

``segment_module`` cuts ``body[start:end]`` out of the traced graph into its own ``GraphModule``: one placeholder
(the tensor crossing the cut in front), the segment's nodes, ``get_attr`` nodes copied in where they are read,
and one output (the tensor crossing the cut behind). Its submodules *are* the model's own modules, under their
original qualified names, so local layers share parameters with the model and their state_dict keys are the
model's keys.

``AuxNet`` is an aux net: deep copies of the selected units (and of the head), with shape adapters between.

Example::

    layer0 = segment_module(gm, cuts, 0, cuts.valid[0], class_name="LocalLayer0")
    layer0.conv1 is model.conv1      # True: shared, not copied
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._adapters import ShapeAdapter
from ._cuts import GraphCuts
from .plan import AdapterSpec

__all__ = ["segment_module", "AuxNet", "reinitialize"]


def segment_module(root: nn.Module, cuts: GraphCuts, start: int, end: int, *, class_name: str) -> fx.GraphModule:
    """The nodes ``body[start:end]`` as a GraphModule over ``root``'s own submodules and parameters."""
    body = cuts.body
    value_in = cuts.crossing[start]
    value_out = cuts.crossing[end] if end < len(body) else cuts.output_value
    graph = fx.Graph()
    env = {value_in: graph.placeholder(value_in.name if value_in.op != "placeholder" else "x")}
    for node in body[start:end]:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.node_copy(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[value_out])
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name)


def reinitialize(module: nn.Module) -> None:
    """Fresh weights for every submodule that can reset itself (``aux_init="fresh"``)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()


class AuxNet(nn.Module):
    """Adapters and copies of the selected later units, then a copy of the head: logits from a hidden layer."""

    def __init__(self, units: Sequence[nn.Module], adapters: Sequence[Optional[AdapterSpec]], head: nn.Module):
        super().__init__()
        steps: List[nn.Module] = []
        for unit, spec in zip(units, adapters):
            if spec is not None:
                steps.append(ShapeAdapter(spec.in_shape, spec.out_shape, spec.in_layout, spec.out_layout))
            steps.append(unit)
        steps.append(head)
        self.body = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def copy_module(module: nn.Module, *, fresh: bool) -> nn.Module:
    clone = copy.deepcopy(module)
    if fresh:
        reinitialize(clone)
    return clone
