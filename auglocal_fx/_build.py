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
import operator
from typing import List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ._adapters import ShapeAdapter
from ._cuts import GraphCuts, is_size_output
from .plan import AdapterSpec

__all__ = ["segment_module", "AuxNet", "reinitialize"]


def segment_module(root: nn.Module, cuts: GraphCuts, start: int, end: int, *, class_name: str) -> fx.GraphModule:
    """The nodes ``body[start:end]`` as a GraphModule over ``root``'s own submodules and parameters.

    Static values made before ``start`` (see ``_cuts``) are recomputed here. Where one reads the size of an
    activation of an earlier layer, that size is fixed to its value at the example input, and the module checks
    that its input has the example's per-sample shape.
    """
    body = cuts.body
    value_in = cuts.crossing[start]
    value_out = cuts.crossing[end] if end < len(body) else cuts.output_value
    graph = fx.Graph()
    placeholder = graph.placeholder(value_in.name if value_in.op != "placeholder" else "x")
    env = {value_in: placeholder}
    guarded = []
    batch_size = _batch_of(cuts.input_node)

    def materialize(node: fx.Node):
        if node in env:
            return env[node]
        source = node.args[0] if node.args else None
        if (
            _is_metadata_read(node) and isinstance(source, fx.Node) and source not in env
            and source.op != "get_attr" and source not in cuts.static
        ):
            # A metadata read of an activation this module does not see: its value at the example input.
            if not guarded:
                expected = tuple(value_in.meta["tensor_meta"].shape[1:])
                guarded.append(graph.call_function(check_input_shape, (placeholder, expected, class_name)))
            env[node] = _example_metadata(node, source, placeholder, graph, batch_size)
            return env[node]
        for arg in node.all_input_nodes:
            materialize(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    keep = {placeholder}
    for node in body[start:end]:
        for arg in node.all_input_nodes:
            if arg not in env and (arg.op == "get_attr" or arg in cuts.static):
                materialize(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node not in cuts.static:
            keep.add(env[node])
    keep.add(graph.output(env[value_out]))
    keep.update(guarded)
    # Static values this module computes but does not use (the layers that read them recompute them): dropped,
    # so that no parameter sits in a module without taking part in its output (an aux net's unit would never
    # give it a gradient).
    unused = [n for n in graph.nodes if n not in keep and not n.users]
    while unused:
        for n in unused:
            graph.erase_node(n)
        unused = [n for n in graph.nodes if n not in keep and not n.users]
    graph.lint()
    return fx.GraphModule(root, graph, class_name=class_name)


def check_input_shape(x: torch.Tensor, expected: tuple, layer: str) -> None:
    """Raise unless ``x`` has the per-sample shape a layer with fixed sizes was built for."""
    if tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{layer} was built for inputs of per-sample shape {tuple(expected)} and got {tuple(x.shape[1:])}: it "
            "recomputes values derived from activation sizes (rotary or relative position tables) at the sizes of the "
            "conversion's input_size. Convert with input_size equal to the size of the images you feed."
        )


def _is_metadata_read(node: fx.Node) -> bool:
    if is_size_output(node):
        return True
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in (
        "shape", "ndim", "dtype", "device")


def _batch_of(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return int(meta.shape[0]) if meta is not None and len(meta.shape) else None


def batch_first_shape(batch: int, rest: tuple) -> torch.Size:
    """``torch.Size((batch, *rest))``: an activation's shape rebuilt from this layer's own batch size."""
    return torch.Size((batch,) + tuple(rest))


def _example_metadata(node: fx.Node, source: fx.Node, placeholder: fx.Node, graph: fx.Graph, batch_size):
    """The value of ``node`` (``x.shape``, ``x.size(d)``, ``x.dim()``, ``x.ndim``, ``x.dtype``, ``x.device``, a size
    output of a registered size function) at the example input, as a constant, except what varies with the batch: the batch size and the device are read
    from this module's own input (whose first dimension is the batch, see ``_cuts.classify_values``)."""
    if is_size_output(node):
        return copy.deepcopy(node.meta["value"])
    meta = source.meta["tensor_meta"]
    shape = tuple(int(v) for v in meta.shape)
    batched = bool(shape) and batch_size is not None and shape[0] == batch_size

    def whole():
        if not batched:
            return torch.Size(shape)
        size0 = graph.call_method("size", (placeholder, 0))
        return graph.call_function(batch_first_shape, (size0, shape[1:]))

    if node.op == "call_method" and node.target == "size":
        if len(node.args) == 1:
            return whole()
        dim = node.args[1] + len(shape) if node.args[1] < 0 else node.args[1]
        if dim == 0 and batched:
            return graph.call_method("size", (placeholder, 0))
        return shape[dim]
    if node.op == "call_method" and node.target == "dim":
        return len(shape)
    attr = node.args[1]
    if attr == "shape":
        return whole()
    if attr == "ndim":
        return len(shape)
    if attr == "dtype":
        return meta.dtype
    if attr == "device":
        return graph.call_function(getattr, (placeholder, "device"))
    raise AssertionError(f"not a metadata read: {node.format_node()}")


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
    """A deep copy for an aux net (re-initialised when ``fresh``) that never writes into its input."""
    clone = copy.deepcopy(module)
    if fresh:
        reinitialize(clone)
    if isinstance(clone, fx.GraphModule):
        copy_input_before_inplace_use(clone)
    return clone


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor})


def _writes_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may modify its first argument in place (``relu(inplace=True)``, ``x += y``, ``x.add_(y)``)."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_function":
        return node.kwargs.get("inplace") is True or node.target in _INPLACE_OPERATORS or (
            getattr(node.target, "__name__", "").endswith("_") and not node.target.__name__.startswith("_"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def copy_input_before_inplace_use(gm: fx.GraphModule) -> bool:
    """Give ``gm`` a private copy of its input when one of its ops writes into that input in place.

    In the model, a unit may begin with an in-place op (torchvision's ``ReLU(inplace=True)`` right after a cut
    inside a block). Copied into an aux net behind another unit, the same op would write into that unit's output,
    which its autograd graph saved for backward (an error at ``backward()``), or into the local layer's output
    before the next layer reads it (a silent change). Every use of the input is then redirected to a clone, so the
    values seen downstream are those of the original module. Returns whether a copy was inserted.

    Example: a unit ``relu_1 = self.relu(add_7)`` with ``self.relu.inplace`` becomes
    ``add_7_copy = add_7.clone(); relu_1 = self.relu(add_7_copy)``.
    """
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    changed = False
    for placeholder in inputs:
        users = list(placeholder.users)
        if not any(_writes_in_place(gm, user) and user.args and user.args[0] is placeholder for user in users):
            continue
        with graph.inserting_after(placeholder):
            private = graph.call_method("clone", (placeholder,))
        for user in users:
            user.replace_input_with(placeholder, private)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return changed
