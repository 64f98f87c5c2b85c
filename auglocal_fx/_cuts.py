"""Step 3 of the pipeline: find the valid cut points of a traced graph.

The graph's computing nodes (everything but placeholders, ``get_attr`` and the output) are numbered in execution
order: ``body[0] .. body[N-1]``. Cut position ``p`` lies between ``body[p-1]`` and ``body[p]``. A value *crosses*
position ``p`` when it is produced before ``p`` and used at or after it. A cut is valid when exactly one value
crosses it and that value is a tensor. Parameters and buffers read with ``get_attr`` never cross: they are copied
into every layer that reads them (a ViT's class token and position embedding belong to the stem).

Example (torchvision resnet18)::

    cuts = find_cuts(gm)
    cuts.body[cuts.valid[0] - 1].name      # 'conv1' -> the cut right after the first convolution
    cuts.crossing[cuts.valid[-1]].name      # 'flatten' -> the last valid cut feeds the classifier
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch.fx as fx

from ._shapes import is_tensor_meta

__all__ = ["GraphCuts", "find_cuts"]


@dataclass
class GraphCuts:
    body: List[fx.Node]  # computing nodes in execution order
    input_node: fx.Node  # the graph's placeholder
    output_value: fx.Node  # the node whose value the graph returns
    crossing: Dict[int, fx.Node]  # valid cut position -> the one tensor crossing it (0: input, N: output)
    position: Dict[fx.Node, int]  # body node -> its index

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
    for value in [input_node] + body:
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
            if is_tensor_meta(value.meta.get("tensor_meta")):
                crossing[p] = value
    output_value = output_node.args[0]
    return GraphCuts(body=body, input_node=input_node, output_value=output_value, crossing=crossing, position=position)
