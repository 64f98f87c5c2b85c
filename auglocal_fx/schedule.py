"""AugLocal's two rules: the pyramidal aux-net depth and the uniform selection of later units.

Both follow the reference implementation exactly, including Python's ``round`` (ties to even), which decides
the paper's depth lists::

    >>> depth_schedule(16, aux_depth=2, pyramid=0.5)       # ResNet-32, K=16
    [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    >>> select_aux_units(0, 16, 2), select_aux_units(14, 16, 2)
    ([8, 15], [15])
"""
from __future__ import annotations

from typing import List

__all__ = ["depth_schedule", "select_aux_units", "validate_schedule_args"]


def validate_schedule_args(*, aux_depth: int, pyramid: float) -> None:
    if isinstance(aux_depth, bool) or not isinstance(aux_depth, int) or aux_depth < 1:
        raise ValueError(f"aux_depth must be an integer >= 1 (the number of later units copied into each aux net), got {aux_depth!r}")
    if isinstance(pyramid, bool) or not isinstance(pyramid, (int, float)) or not 0.0 <= float(pyramid) <= 1.0:
        raise ValueError(f"pyramid must be a number in [0, 1] (0 keeps every aux net at aux_depth), got {pyramid!r}")


def depth_schedule(num_layers: int, aux_depth: int, pyramid: float) -> List[int]:
    """Aux-net depth of local layers ``0 .. num_layers-2``: ``max(1, round(d*(1 - i*tau/(K-2)) + i*tau/(K-2)))``."""
    validate_schedule_args(aux_depth=aux_depth, pyramid=pyramid)
    k = num_layers
    depths = []
    for i in range(max(k - 1, 0)):
        ratio = i * pyramid / (k - 2) if k > 2 else 0.0
        depths.append(max(1, round(aux_depth * (1 - ratio) + ratio)))
    return depths


def select_aux_units(end_unit: int, num_units: int, depth: int) -> List[int]:
    """Units copied into the aux net of a layer ending at unit ``end_unit``: uniform over the later units.

    ``round(e + (L-1-e)/d * j)`` for ``j = 1..d``; every later unit when ``d >= L-1-e``. The last unit is always in.
    """
    remaining = num_units - 1 - end_unit
    if remaining <= 0:
        raise ValueError(f"unit {end_unit} is the last of {num_units}: it has no later units to build an aux net from")
    if depth >= remaining:
        return list(range(end_unit + 1, num_units))
    return [round(end_unit + remaining / depth * j) for j in range(1, depth + 1)]
