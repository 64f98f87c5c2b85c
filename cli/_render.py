"""Rich tables for the command line (library code returns data; only the CLI layer draws)."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["make_console", "human", "shape", "names", "summary_table", "units_table", "file_size", "totals"]


def make_console(*, stderr: bool = False) -> Console:
    console = Console(highlight=False, stderr=stderr, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or captured output: a wide table beats one whose cells wrap over several lines.
        console = Console(highlight=False, stderr=stderr, soft_wrap=False, width=160)
    return console


def human(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def file_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def shape(value: Optional[Sequence[int]]) -> str:
    return "-" if not value else "x".join(str(v) for v in value)


def names(items: Sequence[str], limit: int = 3) -> str:
    """``a, b, c`` or, for long lists, ``first … last (n)`` so that a K=2 layer stays on one line."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items) or "-"
    return f"{items[0]} … {items[-1]} ({len(items)})"


def summary_table(plan: Any, rows: List[Mapping[str, Any]], *, title: Optional[str] = None) -> Table:
    """The per-layer table of a LocalModel (``lm.summary_rows()``): AugLocal's aux units shown by name, other
    rules' aux nets by their one-line description."""
    unit_names = [u.name for u in plan.units]
    copies_units = (plan.config.get("rule") or "auglocal") == "auglocal"
    aux_columns = (("aux depth", "right"), ("aux net units", "left"), ("adapters", "right")) if copies_units else (
        ("aux net", "left"),)
    table = Table(title=title, title_justify="left", header_style="bold")
    for header, justify in (
        ("layer", "right"), ("units", "left"), ("out shape", "left"), ("params", "right"), ("FLOPs", "right"),
        *aux_columns, ("aux params", "right"), ("aux FLOPs", "right"),
    ):
        table.add_column(header, justify=justify, no_wrap=header in ("units", "aux net units", "out shape"))
    for row in rows:
        aux_units = row.get("aux_units")
        if copies_units:
            aux_cells = (
                "-" if row.get("aux_depth") is None else str(row["aux_depth"]),
                "-" if aux_units is None else names([unit_names[i] if isinstance(i, int) else str(i) for i in aux_units] + ["head"], 4),
                "-" if row.get("aux_adapters") is None else str(row["aux_adapters"]),
            )
        else:
            aux_cells = (row.get("aux_net") or "-",)
        table.add_row(
            str(row.get("layer")),
            names([str(u) for u in row.get("units") or []]),
            shape(row.get("out_shape")),
            human(row.get("params")),
            human(row.get("flops")),
            *aux_cells,
            human(row.get("aux_params")),
            human(row.get("aux_flops")),
        )
    return table


def units_table(units: Iterable[Mapping[str, Any]], head: Optional[Mapping[str, Any]] = None) -> Table:
    """The units of an inspected model, then its head."""
    table = Table(header_style="bold")
    for header, justify in (("unit", "right"), ("name", "left"), ("modules", "left"), ("in shape", "left"),
                            ("out shape", "left"), ("params", "right"), ("FLOPs", "right")):
        table.add_column(header, justify=justify, no_wrap=header != "modules")
    for i, unit in enumerate(units):
        table.add_row(
            str(unit.get("index", i)),
            str(unit.get("name", "")),
            names([str(m) for m in unit.get("modules") or []]),
            shape(unit.get("in_shape")),
            shape(unit.get("out_shape")),
            human(unit.get("params")),
            human(unit.get("flops")),
        )
    if head:
        table.add_row(
            "", "head", names([str(m) for m in head.get("modules") or []]), shape(head.get("in_shape")),
            shape(head.get("out_shape")), human(head.get("params")), human(head.get("flops")), style="dim",
        )
    return table


def totals(plan: Any) -> Dict[str, float]:
    return {
        "backbone_params": sum(layer.params for layer in plan.layers),
        "backbone_flops": sum(layer.flops for layer in plan.layers),
        "aux_params": sum(aux.params for aux in plan.aux),
        "aux_flops": sum(aux.flops for aux in plan.aux),
    }
