"""The engine's output layer: a rich progress bar while training, one line per epoch, a final table.

Everything the engine shows goes through :class:`Reporter`; ``Reporter(quiet=True)`` shows nothing, so the
library stays silent when used from Python with ``quiet=True``. Messages also go to the
``auglocal_fx.train`` logger.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["Reporter", "format_losses", "comparison_rows", "comparison_markdown"]

_log = logging.getLogger("auglocal_fx.train")
_log.addHandler(logging.NullHandler())  # a library: no "last resort" echo of warnings the console already shows
_MAX_SHOWN_LOSSES = 8
_LOG_EVERY_SECONDS = 60.0


def format_losses(losses: Sequence[float]) -> str:
    """Per-layer losses, compact: all of them up to 8 layers, else 8 evenly spaced ones (``L0 2.31 L7 1.9 ...``)."""
    k = len(losses)
    if k <= _MAX_SHOWN_LOSSES:
        picks = list(range(k))
    else:
        step = (k - 1) / (_MAX_SHOWN_LOSSES - 1)
        picks = sorted({round(i * step) for i in range(_MAX_SHOWN_LOSSES)})
    return " ".join(f"L{i} {losses[i]:.3f}" for i in picks)


class Reporter:
    def __init__(self, *, quiet: bool = False, console: Optional[Console] = None) -> None:
        self.quiet = quiet
        self.console = console or Console()
        self._progress: Optional[Progress] = None
        self._task: Optional[int] = None
        self._last_line = time.monotonic()

    # -- messages -----------------------------------------------------------------------------------------
    def message(self, text: str, *, style: Optional[str] = None) -> None:
        _log.info(text)
        if not self.quiet:
            self.console.print(text, style=style, highlight=False, markup=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        _log.warning(text)
        if not self.quiet:
            self.console.print(f"warning: {text}", style="yellow", highlight=False, markup=False, soft_wrap=True)

    # -- progress bar -------------------------------------------------------------------------------------
    def start(self, description: str, total: int, *, completed: int = 0) -> None:
        if self.quiet:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")

    def update(self, completed: int, *, info: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, info=info)
            # Without a terminal (nohup, a batch job's log) the bar is not drawn: log a line now and then.
            if not self.console.is_terminal and info:
                now = time.monotonic()
                if now - self._last_line >= _LOG_EVERY_SECONDS:
                    self._last_line = now
                    task = self._progress.tasks[-1]
                    self.message(f"{task.description} {completed}/{task.total}  {info}")

    def finish_task(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None

    # -- epoch lines and the final table ------------------------------------------------------------------
    def epoch_line(self, record: Dict[str, Any], *, epochs: int) -> None:
        parts = [f"[{record['rule']}] epoch {record['epoch']}/{epochs}",
                 f"loss {record['train_loss']:.4f}"]
        if record.get("eval_top1") is not None:
            parts.append(f"test top-1 {record['eval_top1']:.2f}% best {record['best_top1']:.2f}%")
        layer_acc: List[float] = record.get("layer_acc") or []
        if len(layer_acc) > 1:
            parts.append(f"layer-wise {layer_acc[0]:.1f} -> {layer_acc[-2]:.1f} -> {layer_acc[-1]:.1f}%")
        parts.append(f"lr {record['lr']:.4g}")
        parts.append(f"{record['epoch_time']:.1f}s, {record['train_throughput']:,.0f} img/s")
        if record.get("peak_mem_mb"):
            parts.append(f"peak {record['peak_mem_mb']:,.0f} MiB")
        self.message("  ".join(parts))

    def results_table(self, rows: Sequence[Dict[str, Any]], *, title: str) -> None:
        _log.info("%s: %s", title, rows)
        if self.quiet:
            return
        table = Table(title=title)
        header, cells = comparison_rows(rows)
        for column in header + ["run folder"]:
            table.add_column(column, justify="left" if column == "rule" else "right")
        for row, line in zip(rows, cells):
            table.add_row(*line, str(row["run_dir"]))
        self.console.print(table)


def comparison_rows(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """The end-of-training table, one row per rule: header and formatted cells (shared by the console table and
    the markdown file written next to the runs)."""
    from ..summary import human_number

    header = ["rule", "test top-1", "best top-1", "epochs", "time", "peak memory", "aux params", "aux FLOPs"]
    cells = []
    for row in rows:
        cells.append([
            row["rule"],
            "-" if row.get("top1") is None else f"{row['top1']:.2f}%",
            "-" if row.get("best_top1") is None else f"{row['best_top1']:.2f}%",
            str(row["epochs"]),
            f"{row['seconds']:.1f}s",
            f"{row['peak_mem_mb']:,.0f} MiB" if row.get("peak_mem_mb") else "-",
            human_number(row.get("aux_params") or 0),
            human_number(row.get("aux_flops") or 0),
        ])
    return header, cells


def comparison_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    header, cells = comparison_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n"
