"""Step 3 of the pipeline: find the valid cut points of a traced graph.

The graph's computing nodes (everything but placeholders, ``get_attr`` and the output) are numbered in execution
order: ``body[0] .. body[N-1]``. Cut position ``p`` lies between ``body[p-1]`` and ``body[p]``. A value *crosses*
position ``p`` when it is produced before ``p`` and used at or after it. A cut is valid when exactly one value
crosses it and that value is a tensor. Parameters and buffers read with ``get_attr`` never cross: they are copied
into every layer that reads them (a ViT's class token and position embedding belong to the stem).

*Static* values never cross either: values computed from parameters, buffers, constants and the sizes of
activations other than the batch size (a rotary position table built from the patch grid, a relative position
index), and the size outputs of functions registered with ``register_size_function`` (the ``feat_size`` a
pooling helper returns). A layer that reads one recomputes it, with the sizes fixed to those of the example input
(see ``_build.segment_module``). A value that depends on the batch size or on the activations' data is not static.

Example (torchvision resnet18)::

    cuts = find_cuts(gm)
    cuts.body[cuts.valid[0] - 1].name      # 'conv1' -> the cut right after the first convolution
    cuts.crossing[cuts.valid[-1]].name      # 'flatten' -> the last valid cut feeds the classifier
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

import torch
import torch.fx as fx

from ._registry import get_size_outputs
from ._shapes import is_tensor_meta

__all__ = ["GraphCuts", "find_cuts", "static_values", "classify_values", "is_size_output"]

# Metadata of an activation that is fixed by the input size: reading it does not read the activation's data.
_META_ATTRS = ("shape", "ndim", "dtype", "device")
_RANDOM_OPS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
               torch.bernoulli, torch.normal, torch.randperm, torch.multinomial}


def _meta_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if is_tensor_meta(meta) else None


def _normalized(index, ndim):
    return index + ndim if isinstance(index, int) and index < 0 and ndim is not None else index


def _batch_size(nodes: List[fx.Node]):
    placeholders = [n for n in nodes if n.op == "placeholder"]
    shape = _meta_shape(placeholders[0]) if placeholders else None
    return shape[0] if shape else None


def classify_values(nodes: List[fx.Node]) -> Tuple[Set[fx.Node], Set[fx.Node]]:
    """``(static, batched)``: the values a layer can recompute instead of receiving them.

    *Static* values come from parameters, constants and the sizes of activations other than the batch size
    (``x.shape[1]``, ``x.size(-1)``, ``x.ndim``, ``x.dtype``, ``x.device``): a rotary position table built from the
    patch grid. *Batched* values also read the batch size (``B, N, C = x.shape`` used at the end of a stage);
    a layer recomputes them from the batch size of its own input, so they may only cross a cut whose tensor is
    batch-first. Random and in-place operations are never recomputed. Everything else is *data*.
    """
    batch = _batch_size(nodes)
    kind: Dict[fx.Node, str] = {}  # data, static, batch, shape (a batch-first shape), shape_nb (another shape)

    def batch_first(node: fx.Node) -> bool:
        shape = _meta_shape(node)
        return bool(shape) and batch is not None and shape[0] == batch

    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            kind[node] = "data"
            continue
        if node.op == "get_attr":
            kind[node] = "static"
            continue
        if node.op == "output":
            continue
        source = inputs[0] if inputs else None
        if source is not None and kind.get(source) == "data" and node.args and node.args[0] is source:
            # A metadata read of an activation.
            shape = _meta_shape(source)
            ndim = len(shape) if shape is not None else None
            whole = "shape" if batch_first(source) else "shape_nb"
            if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in _META_ATTRS:
                kind[node] = whole if node.args[1] == "shape" else "static"
                continue
            if node.op == "call_method" and node.target == "dim" and len(node.args) == 1 and not node.kwargs:
                kind[node] = "static"
                continue
            if node.op == "call_method" and node.target == "size" and not node.kwargs:
                if len(node.args) == 1:
                    kind[node] = whole
                    continue
                if len(node.args) == 2 and isinstance(node.args[1], int):
                    if _normalized(node.args[1], ndim) != 0:
                        kind[node] = "static"
                    else:
                        kind[node] = "batch" if whole == "shape" else "data"
                    continue
        if is_size_output(node):
            kind[node] = "static"  # sizes a leaf function computed from its inputs' shapes (register_size_function)
            continue
        if (
            node.op == "call_function" and node.target is operator.getitem and source is not None
            and kind.get(source) in ("shape", "shape_nb")
        ):
            index = node.args[1]
            ndim = len(_meta_shape(source.args[0])) if _meta_shape(source.args[0]) is not None else None
            if isinstance(index, int):
                reads_batch = _normalized(index, ndim) == 0
            elif isinstance(index, slice) and (index.start is None or isinstance(index.start, int)) and index.step in (None, 1):
                start = 0 if index.start is None else _normalized(index.start, ndim)
                reads_batch = start is None or start <= 0
            else:
                kind[node] = "data"
                continue
            if not reads_batch:
                kind[node] = "static"
            else:
                kind[node] = "batch" if kind[source] == "shape" else "data"
            continue
        impure = (
            (node.op == "call_method" and str(node.target).endswith("_"))
            or (node.op == "call_function" and node.target in _RANDOM_OPS)
            or (node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"))
        )
        kinds = {kind.get(a) for a in inputs}
        if impure or not kinds <= {"static", "batch"}:
            kind[node] = "data"
        else:
            kind[node] = "batch" if "batch" in kinds else "static"
    # A whole shape read only through recomputable indices is recomputable too.
    for node, k in list(kind.items()):
        if k in ("shape", "shape_nb"):
            users = node.users
            if users and all(u.target is operator.getitem and kind.get(u) in ("static", "batch") for u in users):
                kind[node] = "batch" if any(kind.get(u) == "batch" for u in users) else "static"
            else:
                kind[node] = "data"
    static = {n for n, k in kind.items() if k == "static" and n.op != "get_attr"}
    batched = {n for n, k in kind.items() if k == "batch"}
    return static, batched


def is_size_output(node: fx.Node) -> bool:
    """Whether ``node`` is ``fn(...)[i]`` for a function registered with ``register_size_function`` and ``i`` one
    of its size outputs, with the value known at the example input."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    source, index = node.args
    return (
        isinstance(source, fx.Node) and source.op == "call_function" and isinstance(index, int)
        and index in get_size_outputs(source.target) and "value" in node.meta
    )


def static_values(nodes: List[fx.Node]) -> Set[fx.Node]:
    """The values a layer recomputes instead of receiving them (static and batched, see classify_values)."""
    static, batched = classify_values(nodes)
    return static | batched


@dataclass
class GraphCuts:
    body: List[fx.Node]  # computing nodes in execution order
    input_node: fx.Node  # the graph's placeholder
    output_value: fx.Node  # the node whose value the graph returns
    crossing: Dict[int, fx.Node]  # valid cut position -> the one tensor crossing it (0: input, N: output)
    position: Dict[fx.Node, int]  # body node -> its index
    static: Set[fx.Node] = field(default_factory=set)  # recomputed by the layers that read them (classify_values)
    batched: Set[fx.Node] = field(default_factory=set)  # the static ones that read the batch size

    @property
    def valid(self) -> List[int]:
        """Valid interior cut positions (1..N-1), ascending."""
        return sorted(p for p in self.crossing if 0 < p < len(self.body))

    def value_into(self, position: int) -> fx.Node:
        return self.crossing[position]

    def node_name_before(self, position: int) -> str:
        return self.body[position - 1].name


def find_cuts(gm: fx.GraphModule) -> GraphCuts:
    nodes = list(gm.graph.nodes)
    (input_node,) = [n for n in nodes if n.op == "placeholder"]
    (output_node,) = [n for n in nodes if n.op == "output"]
    body = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    position = {n: i for i, n in enumerate(body)}
    n_body = len(body)

    # A value defined at index d (the input: -1) and last used at index u crosses positions d+1 .. u.
    starts: Dict[int, List[fx.Node]] = {}
    ends: Dict[int, List[fx.Node]] = {}
    pure_static, batched = classify_values(nodes)
    static = pure_static | batched
    batch = _batch_size(nodes)
    live_batched: Dict[int, int] = {}  # position -> number of batched values crossing it
    for value in [input_node] + body:
        if value in static:
            # Recomputed wherever it is read, like a get_attr; a batched one needs a batch-first tensor at the cut.
            if value in batched:
                users = [position.get(u, n_body) for u in value.users]
                for p in range(position[value] + 1, max(users, default=position[value]) + 1):
                    live_batched[p] = live_batched.get(p, 0) + 1
            continue
        users = [position.get(u, n_body if u is output_node else None) for u in value.users]
        users = [u for u in users if u is not None]
        if not users:
            continue
        first, last = position.get(value, -1) + 1, max(users)
        if last >= first:
            starts.setdefault(first, []).append(value)
            ends.setdefault(last + 1, []).append(value)

    crossing: Dict[int, fx.Node] = {}
    live: Dict[fx.Node, None] = {}
    for p in range(0, n_body + 1):
        for value in ends.get(p, ()):
            live.pop(value, None)
        for value in starts.get(p, ()):
            live[value] = None
        if len(live) == 1:
            (value,) = live
            meta = value.meta.get("tensor_meta")
            if is_tensor_meta(meta) and (not live_batched.get(p) or (len(meta.shape) and meta.shape[0] == batch)):
                crossing[p] = value
    output_value = output_node.args[0]
    return GraphCuts(body=body, input_node=input_node, output_value=output_value, crossing=crossing, position=position,
                     static=static, batched=batched)
