"""Per-epoch metrics to CSV and JSONL (rewritten from the run's history, so a resumed run never
duplicates a line), and to TensorBoard when it is installed."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .._fsync import atomic_write_text

__all__ = ["MetricsWriter", "flatten_record", "read_history"]

_log = logging.getLogger("auglocal_fx.train")


def flatten_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """Lists become numbered columns: ``layer_acc`` -> ``layer_acc_0``, ``layer_acc_1``, ..."""
    flat: Dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                flat[f"{key}_{i}"] = v
        else:
            flat[key] = value
    return flat


class MetricsWriter:
    """Writes ``metrics.csv`` and ``metrics.jsonl`` in ``run_dir``; TensorBoard events under ``run_dir/tb``."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._tb_logged = 0
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                _log.debug("tensorboard is not installed; skipping TensorBoard logs")
            else:
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def write(self, history: Sequence[Dict[str, Any]]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in history))
        rows = [flatten_record(r) for r in history]
        columns: List[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())
        self._write_tensorboard(history)

    def _write_tensorboard(self, history: Sequence[Dict[str, Any]]) -> None:
        if self._tb is None:
            return
        for record in history[self._tb_logged:]:
            step = record["epoch"]
            for key, value in flatten_record(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self._tb.add_scalar(key.replace("layer_acc_", "layer_acc/").replace(
                        "train_layer_loss_", "train_layer_loss/"), value, step)
        self._tb_logged = len(history)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_history(run_dir: Path) -> Optional[List[Dict[str, Any]]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
