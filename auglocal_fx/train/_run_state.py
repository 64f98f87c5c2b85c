"""A run's checkpoint: what it holds, how rank 0 writes it, and how a run resumes from it.

Resuming continues from ``checkpoint.pt`` to the same result as an uninterrupted run: the model, optimizer,
scheduler, grad scaler, every rank's RNG state, the metric history and the position in the data are restored. A
checkpoint written by a run on another number of ranks resumes too (rank 0 takes the saved stream, the others
start theirs afresh from where the run stands). A recipe changed in what it trains is refused with the fields
that changed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..distributed._ops import gather_objects, rank_seed
from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._results import TrainError
from ._setup import seed_everything

__all__ = ["CheckpointState", "recipe_changes"]

# Recipe fields that may change between a run and its resumption: where things are, not what is trained.
_RESUMABLE_CHANGES = frozenset({
    "name", "description", "rule", "device", "num_threads", "output_dir", "compile", "eval_batch_size",
    "limit_eval_batches", "dist_timeout", "bucket_cap_mb",
    "data.root", "data.download", "data.num_workers", "data.pin_memory",
})


def recipe_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> List[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        where = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "kwargs":
            changes += recipe_changes(a, b, prefix=f"{where}.")
        elif a != b and where not in _RESUMABLE_CHANGES:
            changes.append(f"{where} ({a!r} -> {b!r})")
    return changes


class CheckpointState:
    """The checkpoint half of :class:`~auglocal_fx.train._run.Run` (it provides ``recipe``, ``rule``, ``lm``,
    ``optimizer``, ``scheduler``, ``scaler``, ``ctx``, ``ckpt_path`` and the run's history)."""

    def _state(self, *, next_epoch: int, next_step: int, epoch_stats: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "rule": self.rule,
            "next_epoch": next_epoch,
            "next_step": next_step,
            "epoch_stats": epoch_stats,
            "model": self.lm.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "history": self.history,
            "world_size": self.ctx.world_size,
            "best_top1": self.best_top1,
            "elapsed": self.elapsed,
            "plan": self.lm.plan.to_dict(),
        }

    def _save(self, **position: Any) -> None:
        # Every rank reaches this point (gathering their RNG states is a collective); rank 0 alone writes.
        ranks_rng = gather_objects(self.ctx, rng_state()) if self.ctx.distributed else None
        if not self.ctx.is_main:
            return
        state = self._state(**position)
        if ranks_rng is not None:
            state["rng_ranks"] = ranks_rng
        save_checkpoint(state, self.ckpt_path)

    def _restore(self) -> Tuple[int, int, Optional[Dict[str, Any]]]:
        state = load_checkpoint(self.ckpt_path)
        if state.get("rule") != self.rule:
            raise TrainError(f"{self.ckpt_path} is a {state.get('rule')!r} run, not {self.rule!r}")
        changes = recipe_changes(state["recipe"], self.recipe.to_dict())
        if changes:
            raise TrainError(
                f"cannot resume {self.ckpt_path}: the recipe changed since it was written: {'; '.join(changes)}. "
                "Resume with the same recipe, or start a new run in another folder (-o)"
            )
        self.lm.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        ranks_rng = state.get("rng_ranks")
        if ranks_rng is not None and len(ranks_rng) == self.ctx.world_size:
            set_rng_state(ranks_rng[self.ctx.rank])
        elif self.ctx.rank == 0:
            set_rng_state(state["rng"])
        else:  # written by a run on fewer ranks: this rank's stream starts afresh, from where the run stands
            seed_everything(rank_seed(self.recipe.seed, self.ctx.rank, int(state["next_epoch"]),
                                      int(state["next_step"])))
        self.history = list(state["history"])
        self.best_top1 = state["best_top1"]
        self.elapsed = float(state["elapsed"])
        return int(state["next_epoch"]), int(state["next_step"]), state["epoch_stats"]
