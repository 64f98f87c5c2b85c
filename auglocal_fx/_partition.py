"""Step 5 of the pipeline: choose the K-1 cut positions that split the units into K local layers.

- ``K == L`` (units): one unit per layer.
- ``K < L``: contiguous groups of units whose largest total FLOPs is as small as possible (linear partition).
- ``K > L``: every unit boundary plus valid cuts inside the units, splitting the most expensive piece first at
  its most balanced inner cut.
The head always joins the last layer, so cuts lie strictly before the head.

Example::

    balanced_cuts(unit_bounds=[0, 3, 9, 12], flops=[10, 30, 10], layers=2)    # -> [3] or [9]
"""
from __future__ import annotations

from typing import List, Sequence

from .errors import ConversionError

__all__ = ["linear_partition", "group_units", "refine_cuts"]


def linear_partition(costs: Sequence[float], groups: int, *, later_cuts: bool = False) -> List[int]:
    """Where each of groups 2..G starts, for the contiguous split of ``costs`` into ``groups`` non-empty groups
    whose largest sum is as small as possible (exact dynamic programming, O(G x n^2)). Among equally good splits
    the earliest cuts win, or the latest ones with ``later_cuts`` (more items in the earlier groups)::

        >>> linear_partition([4, 1, 1, 1, 1], 2), linear_partition([1, 1, 1, 1], 2, later_cuts=True)
        ([1], [2])
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest largest-group sum splitting the first i items into k groups; cut[k][i]: its last cut.
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for k in range(1, groups + 1):
        for i in range(k, n - (groups - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] or (later_cuts and value == best[k][i]):
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(groups, 1, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def group_units(flops: Sequence[int], layers: int) -> List[int]:
    """Indices ``i`` (1..L-1) of the units that start a new layer, balancing FLOPs over ``layers`` groups."""
    n = len(flops)
    if layers >= n:
        return list(range(1, n))
    return linear_partition([max(int(f), 1) for f in flops], layers)


def refine_cuts(
    unit_cuts: Sequence[int], inner_cuts: Sequence[int], node_flops: Sequence[int], layers: int, *, head_start: int
) -> List[int]:
    """Add valid cuts inside units to ``unit_cuts`` until there are ``layers - 1`` cuts."""
    cuts = sorted(set(unit_cuts))
    available = sorted(set(inner_cuts) - set(cuts))
    needed = layers - 1 - len(cuts)
    if needed > len(available):
        raise ConversionError(
            f"layers={layers} is more than this model can be cut into: at most {len(cuts) + len(available) + 1} "
            "local layers (one per valid cut point). Use fewer layers, or `auglocal inspect MODEL` to see the cut points."
        )
    prefix = [0]
    for f in node_flops:
        prefix.append(prefix[-1] + max(int(f), 1))
    for _ in range(needed):
        bounds = [0] + cuts + [head_start]
        best = None
        for s, e in zip(bounds, bounds[1:]):
            inside = [c for c in available if s < c < e]
            if not inside:
                continue
            cost = prefix[e] - prefix[s]
            # Most balanced inner cut; a piece with no compute at all (a lone flatten) only as a last resort.
            split = min(
                inside,
                key=lambda c: (
                    min(prefix[c] - prefix[s] - (c - s), prefix[e] - prefix[c] - (e - c)) <= 0,
                    abs((prefix[c] - prefix[s]) - (prefix[e] - prefix[c])),
                ),
            )
            if best is None or cost > best[0]:
                best = (cost, split)
        cuts.append(best[1])
        available.remove(best[1])
        cuts.sort()
    return cuts
