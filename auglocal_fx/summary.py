"""Plain-text tables and human-readable numbers for summaries (the CLI renders the same rows with rich)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

__all__ = ["format_table", "human_number", "format_cell"]


def human_number(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith(("params", "flops")) and isinstance(value, (int, float)):
        return human_number(value)
    if isinstance(value, (list, tuple)):
        if key.endswith("shape"):
            return "x".join(str(v) for v in value)
        text = ", ".join(str(v) for v in value)
        return text if len(text) <= 48 else text[:45] + "..."
    return str(value)


def format_table(rows: List[Dict[str, Any]], *, title: Optional[str] = None, columns: Optional[Sequence[str]] = None) -> str:
    if not rows:
        return title or ""
    columns = list(columns or rows[0].keys())
    cells = [[format_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)
