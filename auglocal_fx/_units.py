"""Step 4 of the pipeline: group the graph into *units* (the model's natural layers) and find the head.

A unit is one of the model's repeated blocks (a ResNet Bottleneck, a ViT encoder block, a ConvNeXt block) or,
outside blocks, one heavy operation (a convolution or linear layer) with the light operations that follow it
(its norm, activation, pooling): ResNet-50 is its stem (conv1, bn1, relu, maxpool) + 16 Bottlenecks = 17 units.

*Blocks* are found in the module tree: a module that is not a plain container (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) and holds at least two heavy layers. When a block holds repeated blocks
itself (a stage of blocks), its children are the blocks. Unit boundaries that are not valid cuts (inside a
DenseNet dense block, say) are merged away.

The *head* is what follows the last feature map or token sequence: global pooling and the classifier. It starts
at the last valid cut whose tensor still has spatial or token extent, and it must contain a heavy layer.

Example::

    units, head = find_units(model, gm, cuts)
    [u.name for u in units][:3]    # ['conv1', 'layer1.0', 'layer1.1'] for torchvision resnet50
    head.start                     # position of the cut in front of avgpool
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ._cuts import GraphCuts
from .errors import ConversionError

__all__ = ["Segment", "find_units", "node_modules", "is_heavy_node"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Segment:
    """A contiguous range ``body[start:end]`` of the graph."""

    start: int
    end: int
    name: str = ""
    modules: List[str] = field(default_factory=list)


def _is_heavy_module(m: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in m.parameters(recurse=False))


def _get_attr_tensor(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_HEAVY_FUNCTIONS = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "bilinear",
    "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "embedding",
}


def is_heavy_node(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A convolution, linear or embedding: a module with a >=2-D weight, or such a function reading one."""
    if node.op == "call_module":
        return any(p.dim() >= 2 for p in gm.get_submodule(node.target).parameters())
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name not in _HEAVY_FUNCTIONS:
            return False  # adding a position embedding reads a >=2-D parameter but is not a layer
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = _get_attr_tensor(gm, arg.target)
                if isinstance(value, torch.Tensor) and value.dim() >= 2:
                    return True
    return False


def node_modules(node: fx.Node) -> List[str]:
    """Qualified names of the modules a node runs inside, outermost first (from fx's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [qualified for qualified, _ in stack.values()]
    if node.op == "call_module" and (not names or names[-1] != node.target):
        names.append(node.target)
    return names


class _BlockFinder:
    """Decides which module of a node's module stack is its block (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        # Per-instance caches: an lru_cache on the methods would be shared by the class and keep every finder,
        # and with it every analysed model copy, alive forever.
        self.heavy_count = lru_cache(maxsize=None)(self._heavy_count)
        self.is_candidate = lru_cache(maxsize=None)(self._is_candidate)
        self.holds_repeated_blocks = lru_cache(maxsize=None)(self._holds_repeated_blocks)

    def _heavy_count(self, name: str) -> int:
        return sum(1 for m in self.modules[name].modules() if _is_heavy_module(m))

    def _is_candidate(self, name: str) -> bool:
        m = self.modules.get(name)
        return bool(name) and m is not None and type(m) not in _CONTAINERS and self.heavy_count(name) >= 2

    def _holds_repeated_blocks(self, name: str) -> bool:
        """A stage: it contains two or more candidate blocks of one class, with no candidate between them and it."""
        prefix = name + "."
        inner = [
            n for n in self.modules if n.startswith(prefix) and self.is_candidate(n)
            and not any(self.is_candidate(a) for a in _ancestors_between(name, n))
        ]
        counts = Counter(type(self.modules[n]) for n in inner)
        return any(c >= 2 for c in counts.values())

    def block_of(self, node: fx.Node) -> Optional[str]:
        for name in node_modules(node):
            if name in self.modules and self.is_candidate(name) and not self.holds_repeated_blocks(name):
                return name
        return None

    def layer_of(self, node: fx.Node) -> Optional[str]:
        """The outermost non-container module around ``node`` holding one heavy layer (a conv-norm-act, a patch
        merging): its light ops stay with its heavy op."""
        for name in node_modules(node):
            m = self.modules.get(name)
            if name and m is not None and type(m) not in _CONTAINERS and self.heavy_count(name) >= 1:
                return name
        return None


def _ancestors_between(outer: str, inner: str) -> List[str]:
    parts = inner.split(".")
    depth = len(outer.split("."))
    return [".".join(parts[:i]) for i in range(depth + 1, len(parts))]


def _is_pooled(meta) -> bool:
    """No spatial or token extent left: (B, C), or every non-batch dim but one equal to 1."""
    shape = tuple(meta.shape)
    if len(shape) <= 2:
        return True
    rest = shape[1:]
    return sum(1 for s in rest if s != 1) <= 1


@dataclass
class _Item:
    start: int
    end: int
    block: Optional[str]  # the block it belongs to
    layer: Optional[str]  # else the single-layer module it belongs to
    heavy: bool


def _items(cuts: GraphCuts, gm: fx.GraphModule, finder: _BlockFinder) -> List[_Item]:
    """Consecutive nodes of one block, or of one single-layer module, or single loose nodes."""
    items: List[_Item] = []
    for i, node in enumerate(cuts.body):
        block = finder.block_of(node)
        layer = finder.layer_of(node) if block is None else None
        previous = items[-1] if items else None
        if previous is not None and (
            (block is not None and previous.block == block) or (layer is not None and previous.layer == layer)
        ):
            previous.end = i + 1
            previous.heavy = previous.heavy or is_heavy_node(node, gm)
            continue
        items.append(_Item(i, i + 1, block, layer, block is not None or is_heavy_node(node, gm)))
    return items


def _find_head_start(cuts: GraphCuts, items: List[_Item], gm: fx.GraphModule) -> int:
    n_body = len(cuts.body)
    valid = cuts.valid
    unpooled = [p for p in valid if not _is_pooled(cuts.crossing[p].meta["tensor_meta"])]
    flat = [p for p in valid if len(cuts.crossing[p].meta["tensor_meta"].shape) <= 2]
    first_flat = flat[0] if flat else n_body
    # No feature map or token sequence at all (an MLP on flattened pixels): the head is the last layer alone.
    start = unpooled[-1] if unpooled else n_body
    # Blocks that still work on (tiny) feature maps before the features are flattened are not head: a ResNet at
    # 32x32 pools to 1x1 inside layer4.
    for item in items:
        if item.block is not None and item.start >= start and item.end <= first_flat and item.end in cuts.crossing:
            start = max(start, item.end)
    # The head must hold the classifier: step back to the last heavy operation if pooling alone follows.
    if not any(is_heavy_node(n, gm) for n in cuts.body[start:]):
        heavy_items = [it for it in items if it.heavy and it.start < start]
        if heavy_items and heavy_items[-1].block is None and heavy_items[-1].start in cuts.crossing:
            start = heavy_items[-1].start
    return start


def find_units(model: nn.Module, gm: fx.GraphModule, cuts: GraphCuts) -> Tuple[List[Segment], Segment]:
    """Group ``cuts.body`` into units and the head; ``model`` is the module tree the graph was traced from."""
    n_body = len(cuts.body)
    finder = _BlockFinder(model)
    items = _items(cuts, gm, finder)
    head_start = _find_head_start(cuts, items, gm)
    head = Segment(head_start, n_body, "head")
    heavy_at = [i for i, n in enumerate(cuts.body) if is_heavy_node(n, gm)]
    if len(heavy_at) >= 2 and not any(heavy_at[0] < p <= heavy_at[-1] for p in cuts.valid):
        raise ConversionError(
            f"{type(model).__name__} cannot be cut into local layers: between its first and its last weighted "
            "layer there is no point where exactly one tensor is live (parallel streams that only meet at the "
            "output, like CrossViT's two token streams). auglocal-fx cuts where one tensor crosses; change the "
            "model so that the streams are merged into one tensor between blocks."
        )
    if not any(is_heavy_node(n, gm) for n in cuts.body[head_start:]):
        several = (
            " If it has one, the head reads more than one tensor (a multi-scale head fed by every stage, like "
            "EfficientViM's): the graph can then only be cut before the first of them."
            if heavy_at and head_start > heavy_at[-1] else ""
        )
        raise ConversionError(
            f"{type(model).__name__} has no classifier head: nothing after its last feature map has weights "
            "(expected global pooling followed by a linear classifier). auglocal-fx trains classifiers; add a "
            "head, or pass a model created with num_classes > 0." + several
        )
    if head_start == 0:
        raise ConversionError(
            f"{type(model).__name__} has no layers before its classifier head to train locally"
        )

    # Units: a block, or a heavy op with the light ops that follow it.
    bounds: List[Tuple[int, int, Optional[str]]] = []
    anchored = False
    for item in items:
        if item.start >= head_start:
            break
        end = min(item.end, head_start)
        if item.heavy and anchored:
            bounds.append((item.start, end, item.block))
        elif not bounds:
            bounds.append((item.start, end, item.block))
            anchored = item.heavy
        else:
            s, _, b = bounds[-1]
            bounds[-1] = (s, end, b if b is not None else item.block)
            anchored = anchored or item.heavy
    # Merge units whose boundary is not a valid cut (dense blocks, multi-branch stems...).
    merged: List[List] = []
    for s, e, b in bounds:
        if merged and s not in cuts.crossing:
            merged[-1][1] = e
            merged[-1][2].append(b)
        else:
            merged.append([s, e, [b]])
    spans = _module_spans(cuts.body)
    units = []
    for s, e, _ in merged:
        units.append(Segment(s, e, _segment_name(spans, s, e, cuts.body[s]), _segment_modules(cuts.body[s:e])))
    head.modules = _segment_modules(cuts.body[head_start:])
    return units, head


def _module_spans(body: List[fx.Node]) -> Dict[str, Tuple[int, int]]:
    """For every module the graph runs inside: the first and last body index of its nodes."""
    spans: Dict[str, Tuple[int, int]] = {}
    for i, node in enumerate(body):
        for name in node_modules(node):
            first, _ = spans.get(name, (i, i))
            spans[name] = (first, i)
    return spans


def _segment_name(spans: Dict[str, Tuple[int, int]], start: int, end: int, first: fx.Node) -> str:
    """The module a segment is exactly (``layer1.0``), else its first and last whole modules (``conv1..maxpool``)."""
    inside = [name for name, (a, b) in spans.items() if start <= a and b < end]
    outermost = [n for n in inside if not any(n.startswith(o + ".") for o in inside if o != n)]
    outermost.sort(key=lambda n: spans[n][0])
    if not outermost:
        return first.name
    if len(outermost) == 1:
        return outermost[0]
    return f"{outermost[0]}..{outermost[-1]}"


def _segment_modules(nodes: List[fx.Node]) -> List[str]:
    """The top-most distinct module names touched by the nodes (for summaries)."""
    seen: Dict[str, None] = {}
    for node in nodes:
        names = node_modules(node)
        if names:
            seen.setdefault(names[-1], None)
    return list(seen)
