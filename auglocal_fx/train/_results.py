"""What training returns: one :class:`RunResult` per rule, gathered in a :class:`TrainResult`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ._recipe import Recipe

__all__ = ["TrainError", "RunResult", "TrainResult"]


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


@dataclass
class RunResult:
    """The outcome of one rule's run."""

    rule: str
    run_dir: Path
    epochs: int
    top1: Optional[float]
    best_top1: Optional[float]
    layer_acc: Optional[List[float]]
    seconds: float
    artifact: Optional[Path]
    peak_mem_mb: Optional[float] = None  # CUDA: peak allocated; CPU: the process's peak RSS over the run
    aux_params: int = 0  # parameters of the aux nets (0 for backprop)
    aux_flops: int = 0  # forward FLOPs of the aux nets per sample (0 for backprop)
    interrupted: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("history")
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class TrainResult:
    """What :func:`train` returns: one :class:`RunResult` per rule, in the recipe's order."""

    recipe: Recipe
    output_dir: Path
    runs: Dict[str, RunResult]
    interrupted: bool = False

    def __getitem__(self, rule: str) -> RunResult:
        return self.runs[rule]
