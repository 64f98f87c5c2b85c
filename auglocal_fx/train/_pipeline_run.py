"""One rule's run on S pipeline stages (``parallel.stages > 1``): each process trains a contiguous group of local
layers and the stages work on S batches at once.

Every process runs this class. Stage 0 reads the data and sends each batch's boundary activation forward; the
others receive it from the stage before (``auglocal_fx.distributed._pipeline``). The processes are laid out on a
``("pp", "dp")`` device mesh: S stages times N/S data-parallel replicas, whose gradients are averaged per layer.

What stays as in the single-process run (``_run.Run``), and how:

* an epoch is one stream through the pipeline; it fills at the start and drains at the end, so every stage is at
  the same step when the epoch ends: evaluation, the schedule step and the checkpoint happen there;
* evaluation is forward-only through the stages; the layer-wise accuracies are summed over all ranks;
* checkpoints: each stage writes its part (its layers, their optimizers, its scheduler) under ``stages/``, named
  by position; once every part is on disk, rank 0 writes ``checkpoint.pt``, which names them. A crash between the
  two leaves the previous ``checkpoint.pt`` and its parts valid. Parts are looked up by layer, so a run resumes
  with another placement or number of stages;
* Ctrl-C: stage 0 stops feeding batches and sends a STOP marker after the ones in flight; every stage finishes
  those, so all checkpoint parts are at one consistent step;
* the end: rank 0 gathers every stage's weights and writes the one artifact.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..distributed._ops import rank_seed
from ..distributed._pipeline import STOP, Stage
from ..distributed._placement import Placement, PlacementError, make_placement, plan_costs, timed_layer_costs
from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._memory import peak_memory_mb, reset_peak_memory
from ._metrics import MetricsWriter
from ._progress import Reporter, format_losses
from ._recipe import BACKPROP, Recipe
from ._results import RunResult, TrainError
from ._run import NoMetrics, Run
from ._run_state import recipe_changes
from ._setup import build_data, build_model, build_optimizer, build_scheduler, seed_everything

__all__ = ["PipelineRun", "STAGES_DIR"]

STAGES_DIR = "stages"
_REFRESH_SECONDS = 0.5
_DEFAULT_TIMEOUT_S = 600.0


class _StageView:
    """The LocalModel as one stage's optimizer sees it: only this stage's layers have parameters."""

    def __init__(self, lm: nn.Module, layers: List[int]) -> None:
        self.layers = lm.layers  # full length: optimizers are indexed by global layer
        self._lm, self._mine = lm, set(layers)

    def local_parameters(self, k: int) -> List[nn.Parameter]:
        return self._lm.local_parameters(k) if k in self._mine else []

    def parameter_groups(self) -> List[Dict[str, Any]]:
        mine = {id(p) for k in self._mine for p in self._lm.local_parameters(k)}
        return [{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in self._lm.parameter_groups()]


def _layer_keys(k: int) -> Tuple[str, str]:
    return f"layers.{k}.", f"aux.{k}."


class PipelineRun(Run):
    """``Run`` for ``parallel.stages > 1``: same outputs, each process training its stage's layers."""

    def __init__(self, recipe: Recipe, rule: str, run_dir: Path, *, reporter: Reporter, stopper: Any,
                 ctx: Optional[Any] = None) -> None:
        super().__init__(recipe, rule, run_dir, reporter=reporter, stopper=stopper, ctx=ctx)
        if rule == BACKPROP:
            raise TrainError("rule bp cannot run layer-parallel: its backward crosses every layer; train bp without "
                             "parallel.stages (or drop bp from rule)")

    # -- processes ------------------------------------------------------------------------------------------
    def _join(self) -> None:
        """This process's stage and replica on a (pp, dp) mesh; the job is torchrun's (or the caller's ctx)."""
        from ..distributed import init_distributed
        from torch.distributed.device_mesh import init_device_mesh

        stages = self.recipe.parallel.stages
        if not self.ctx.distributed and not dist.is_initialized():
            device_type = "cpu" if self.recipe.device == "cpu" else "auto"
            timeout = getattr(self.recipe, "dist_timeout", None) or _DEFAULT_TIMEOUT_S
            self.ctx = init_distributed(device_type=device_type, timeout_s=timeout)
            if not self.ctx.distributed:
                raise TrainError(f"parallel.stages={stages} needs {stages} processes (one per stage): run with "
                                 f"--nproc-per-node {stages} (or torchrun), or set parallel.stages=1")
        world = self.ctx.world_size
        if world % stages:
            raise TrainError(f"parallel.stages={stages} must divide the number of processes ({world}): each stage "
                             f"gets {world}/{stages} data-parallel replicas; use a multiple of {stages} processes")
        mesh = self.ctx.mesh
        if mesh is None or tuple(mesh.mesh_dim_names or ()) != ("pp", "dp") or mesh.size(0) != stages:
            mesh = init_device_mesh(self.ctx.device.type, (stages, world // stages), mesh_dim_names=("pp", "dp"))
        self.mesh = mesh
        self.stage_index = mesh.get_local_rank("pp")
        self.replica = mesh.get_local_rank("dp")
        self.replicas = world // stages
        ranks = mesh.mesh  # ranks[pp, dp]
        self.prev_rank = int(ranks[self.stage_index - 1, self.replica]) if self.stage_index > 0 else None
        self.next_rank = int(ranks[self.stage_index + 1, self.replica]) if self.stage_index < stages - 1 else None
        self.dp_group = mesh.get_group("dp") if self.replicas > 1 else None
        self.is_main = dist.get_rank() == 0
        self.writes_part = self.replica == 0  # one copy of each stage's state on disk
        if not self.is_main:
            self.reporter = Reporter(quiet=True)

    # -- setup ----------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        import auglocal_fx

        self._join()
        r = self.recipe
        self.device = self.ctx.device if self.ctx.device.type != "cpu" or r.device in ("cpu", "auto") else \
            torch.device(r.device)
        self.comm_device = self.device if self.ctx.backend == "nccl" else torch.device("cpu")
        seed_everything(r.seed)
        # Data-parallel replicas of stage 0 each read their shard of every global batch.
        self.data = build_data(r, self.device, num_replicas=self.replicas, rank=self.replica)
        model = build_model(r, self.data, resuming=self.resuming)
        c = r.convert
        input_size = tuple(c.input_size) if c.input_size else (self.data.in_chans, self.data.img_size,
                                                               self.data.img_size)
        self.input_size = input_size
        # Every process converts the whole model (the same seed gives the same weights everywhere) and moves
        # only its own layers to its device.
        self.lm = auglocal_fx.convert(model, layers=c.layers, aux_depth=c.aux_depth, pyramid=c.pyramid,
                                      aux_init=c.aux_init, input_size=input_size, cuts=c.cuts,
                                      leaf_modules=c.leaf_modules, rule=self.rule,
                                      rule_options=c.rule_options.get(self.rule))
        del model
        self.num_layers = len(self.lm.layers)
        try:
            costs, source = self._layer_costs(input_size)
            self.placement: Placement = make_placement(costs, stages=r.parallel.stages,
                                                       placement=r.parallel.placement, source=source)
        except PlacementError as exc:
            raise TrainError(str(exc)) from None
        self.my_layers = self.placement.stages[self.stage_index]
        for k in self.my_layers:
            self.lm.layers[k].to(self.device)
            if k < len(self.lm.aux):
                self.lm.aux[k].to(self.device)
            if r.channels_last:
                self.lm.layers[k].to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type) if r.amp == "fp16" else None
        # Stages step each layer on its own: the per-layer optimizer is the only one a pipeline can have.
        per_layer = dataclasses.replace(r, optimizer=dataclasses.replace(r.optimizer, per_layer=True))
        self.optimizer = build_optimizer(per_layer, _StageView(self.lm, self.my_layers), self.rule,
                                         before_step=self._before_layer_step, scaler=self.scaler)
        self.per_layer = True
        self.scheduler = build_scheduler(r, self.optimizer)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp)
        self.loss_fn = (nn.CrossEntropyLoss(label_smoothing=r.label_smoothing) if r.label_smoothing > 0
                        else F.cross_entropy)
        if r.compile:
            for k in self.my_layers:
                self.lm.layers[k].compile()
                if k < len(self.lm.aux):
                    self.lm.aux[k].compile()
        train_batches = len(self.data.train_loader)
        if train_batches == 0:
            raise TrainError(f"the training set has fewer samples than batch_size ({r.batch_size}); lower batch_size")
        self.steps_per_epoch = min(train_batches, r.limit_train_batches or train_batches)
        self.metrics = MetricsWriter(self.run_dir) if self.is_main else NoMetrics()
        # Replica 0 keeps a plain run's random streams; the others draw dropout and augmentation of their own.
        seed = rank_seed(r.seed, self.replica)
        seed_everything(seed)
        self.stage = Stage(self.lm, layers=self.my_layers, prev_rank=self.prev_rank, next_rank=self.next_rank,
                           optimizer=self.optimizer, capacity=self.data.train_loader.batch_size, device=self.device,
                           seed=seed,
                           stop_group=self.dp_group if self.stage_index == 0 else None, loss_fn=self.loss_fn,
                           scaler=self.scaler, mean=self.data.mean, std=self.data.std, autocast=self._autocast,
                           input_shape=input_size, comm_device=self.comm_device)

    def _layer_costs(self, input_size: Tuple[int, ...]) -> Tuple[List[float], str]:
        """The cost of each layer's training step: plan FLOPs, or seconds measured on rank 0 and broadcast (every
        rank must place the layers identically)."""
        r = self.recipe
        if r.parallel.balance == "flops" or r.parallel.placement is not None:
            return plan_costs(self.lm.plan), "plan FLOPs"
        costs = [None]
        if dist.get_rank() == 0:
            batch = self.data.train_loader.batch_size or r.batch_size
            costs = [timed_layer_costs(self.lm, input_size, batch, device=self.device)]
        dist.broadcast_object_list(costs, src=0)
        return costs[0], "measured"

    def _before_layer_step(self, k: int, params: List[nn.Parameter]) -> None:
        """Layer ``k`` has its gradients: average them over the stage's replicas, then clip (per layer)."""
        if self.dp_group is not None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.replicas)
                wire = flat.to(self.comm_device)
                dist.all_reduce(wire, group=self.dp_group)
                flat = wire.to(flat.device)
                offset = 0
                for p, g in zip(params, grads):
                    p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                    offset += g.numel()
        super()._before_layer_step(k, params)

    # -- collectives over all ranks -------------------------------------------------------------------------
    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        wire = t.to(self.comm_device, torch.float64)
        dist.all_reduce(wire)
        return wire.cpu()

    def _any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _layer_vector(self, values: torch.Tensor) -> torch.Tensor:
        """This stage's per-layer values placed in a K-vector (zeros elsewhere), to be summed over ranks."""
        out = torch.zeros(self.num_layers, dtype=torch.float64)
        out[self.my_layers] = values.detach().double().cpu()
        return out

    # -- the batches stage 0 reads ----------------------------------------------------------------------------
    def _batches(self, epoch: int, start_step: int):
        from ..data import set_loader_epoch

        loader = self.data.train_loader
        set_loader_epoch(loader, epoch, start_batch=start_step)
        step = start_step
        for x, y in loader:
            if step >= self.steps_per_epoch:
                return
            yield self._to_device(x, y)
            step += 1

    # -- training ---------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, start_step: int, stats: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        r = self.recipe
        stats = dict(stats) if stats else {"loss_sums": torch.zeros(self.num_layers, dtype=torch.float64),
                                            "counts": torch.zeros(self.num_layers, dtype=torch.float64),
                                            "samples": 0, "seconds": 0.0, "skipped": 0,
                                            "lr": self.optimizer.param_groups[0]["lr"]}
        reset_peak_memory(self.device)
        for k in self.my_layers:
            self.lm.layers[k].train()
            if k < len(self.lm.aux):
                self.lm.aux[k].train()
        self.reporter.start(f"[{self.rule}] epoch {epoch + 1}/{r.epochs} (stage 0 of {len(self.placement.stages)})",
                            self.steps_per_epoch, completed=start_step)
        t0 = time.perf_counter()
        last = [0.0]
        seen = [0]

        def on_step(step: int, losses: List[torch.Tensor], batch: int) -> None:
            seen[0] += batch
            done = step - epoch * self.steps_per_epoch + 1  # `step` is global: epoch * steps_per_epoch + batch
            now = time.perf_counter()
            if now - last[0] >= _REFRESH_SECONDS or done == self.steps_per_epoch:
                last[0] = now
                rate = seen[0] * self.replicas / max(now - t0, 1e-9)
                self.reporter.update(done, info=f"{rate:,.0f} img/s  {format_losses([float(v) for v in losses])}")

        first = self.stage.first
        result = self.stage.train_stream(self._batches(epoch, start_step) if first else None,
                                         first_step=epoch * self.steps_per_epoch + start_step,
                                         should_stop=lambda: self.stopper.stop_now,
                                         on_step=on_step if self.is_main else None)
        self.reporter.finish_task()
        seconds = float(stats["seconds"]) + time.perf_counter() - t0
        self.elapsed += time.perf_counter() - t0
        loss_sums = stats["loss_sums"] + self._sum(self._layer_vector(result.loss_sums))
        counts = stats["counts"] + self._sum(self._layer_vector(
            torch.full((len(self.my_layers),), float(result.samples))))
        skipped = int(stats["skipped"]) + int(self._sum(torch.tensor([float(result.skipped)]))[0])
        samples = int(counts[0])
        # Every stage finished the same batches (the STOP marker travels behind them): one consistent step.
        stopped = self._any(result.end == STOP)
        if stopped:
            next_step = (result.steps + start_step) if first else 0
            next_step = int(self._sum(torch.tensor([float(next_step)]))[0]) // self.replicas
            state = {"loss_sums": loss_sums, "counts": counts, "samples": samples, "skipped": skipped,
                     "seconds": seconds, "lr": stats["lr"]}
            self._save(next_epoch=epoch, next_step=next_step, epoch_stats=state)
            return None
        if samples == 0:
            raise TrainError(f"epoch {epoch + 1} trained on no batch (all {skipped} fp16 steps overflowed); "
                             "lower optimizer.lr or use amp: bf16")
        losses = (loss_sums / counts.clamp(min=1)).tolist()
        self._check_finite(losses, epoch, self.steps_per_epoch)
        peak = peak_memory_mb(self.device)
        return {"losses": losses, "samples": samples, "seconds": seconds, "skipped": skipped, "peak_mem_mb": peak,
                "lr": stats["lr"]}

    @torch.no_grad()
    def _evaluate(self) -> Dict[str, Any]:
        for k in self.my_layers:
            self.lm.layers[k].eval()
            if k < len(self.lm.aux):
                self.lm.aux[k].eval()
        limit = self.recipe.limit_eval_batches
        loader = self.data.eval_loader
        total = len(loader) if limit is None else min(limit, len(loader))
        capacity = loader.batch_size
        extra = torch.zeros(2, dtype=torch.float64)  # head loss sum, samples
        # Every replica's pipeline evaluates its shard of the evaluation set; the counts are summed over ranks.
        self.reporter.start(f"[{self.rule}] evaluating", total)

        def batches():
            for i, (x, y) in enumerate(loader):
                if i >= total:
                    return
                self.reporter.update(i + 1)
                yield self._to_device(x, y)

        head_loss = lambda logits, y: F.cross_entropy(logits, y, reduction="sum")
        res = self.stage.eval_stream(batches() if self.stage.first else None, capacity=capacity,
                                     head_loss=head_loss)
        self.reporter.finish_task()
        correct = self._layer_vector(res.correct)
        if self.stage.last:
            extra = torch.tensor([res.head_loss_sum, float(res.samples)], dtype=torch.float64)
        correct, extra = self._sum(correct), self._sum(extra)
        n = max(int(extra[1]), 1)
        acc = (correct * 100.0 / n).tolist()
        return {"eval_top1": acc[-1], "eval_loss": float(extra[0]) / n, "layer_acc": acc,
                "eval_samples": int(extra[1])}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _part_path(self, stage: int, epoch: int, step: int) -> Path:
        return self.run_dir / STAGES_DIR / f"stage{stage}-e{epoch}-b{step}.pt"

    def _my_state(self) -> Dict[str, torch.Tensor]:
        prefixes = tuple(p for k in self.my_layers for p in _layer_keys(k))
        return {k: v.detach().cpu() for k, v in self.lm.state_dict().items() if k.startswith(prefixes)}

    def _save(self, *, next_epoch: int, next_step: int, epoch_stats: Optional[Dict[str, Any]]) -> None:
        """Every stage writes its part; then rank 0 writes checkpoint.pt naming them (the commit point)."""
        path = self._part_path(self.stage_index, next_epoch, next_step)
        if self.writes_part:
            save_checkpoint({"stage": self.stage_index, "layers": list(self.my_layers), "model": self._my_state(),
                             "optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                             "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                             "rng": rng_state(), "position": [next_epoch, next_step]}, path)
        dist.barrier()
        if self.is_main:
            parts = [str(self._part_path(s, next_epoch, next_step).relative_to(self.run_dir))
                     for s in range(len(self.placement.stages))]
            save_checkpoint({"recipe": self.recipe.to_dict(), "rule": self.rule, "next_epoch": next_epoch,
                             "next_step": next_step, "epoch_stats": epoch_stats, "history": self.history,
                             "best_top1": self.best_top1, "elapsed": self.elapsed, "plan": self.lm.plan.to_dict(),
                             "placement": self.placement.stages, "parts": parts}, self.ckpt_path)
        dist.barrier()
        if self.writes_part:  # the new checkpoint is committed: older parts of this stage can go
            for old in (self.run_dir / STAGES_DIR).glob(f"stage{self.stage_index}-*.pt"):
                if old != path:
                    old.unlink(missing_ok=True)

    def _restore(self) -> Tuple[int, int, Optional[Dict[str, Any]]]:
        state = load_checkpoint(self.ckpt_path)
        if state.get("rule") != self.rule:
            raise TrainError(f"{self.ckpt_path} is a {state.get('rule')!r} run, not {self.rule!r}")
        if "parts" not in state:
            raise TrainError(f"{self.ckpt_path} was written by a single-process run; resume it without "
                             "parallel.stages, or start a new run in another folder (-o)")
        saved, current = dict(state["recipe"]), self.recipe.to_dict()
        # The split is where layers run, not what they learn: parts are found by layer, whatever the placement.
        saved.pop("parallel", None)
        current.pop("parallel", None)
        changes = recipe_changes(saved, current)
        if changes:
            raise TrainError(f"cannot resume {self.ckpt_path}: the recipe changed since it was written: "
                             f"{'; '.join(changes)}. Resume with the same recipe, or start a new run in another "
                             "folder (-o)")
        model: Dict[str, torch.Tensor] = {}
        per_layer: List[Any] = [None] * self.num_layers
        own: Optional[Dict[str, Any]] = None
        for rel in state["parts"]:
            part = load_checkpoint(self.run_dir / rel)
            held = [k for k in part["layers"] if k in self.my_layers]
            if not held:
                continue
            prefixes = tuple(p for k in held for p in _layer_keys(k))
            model.update({k: v for k, v in part["model"].items() if k.startswith(prefixes)})
            for k in held:
                per_layer[k] = part["optimizer"]["per_layer"][k]
            if own is None:
                own = part
        missing = [k for k in self._my_state() if k not in model]
        if missing or own is None:
            raise TrainError(f"the checkpoint parts named in {self.ckpt_path} lack {missing[:3] or 'this stage'}; "
                             "they were moved or deleted: start a new run in another folder (-o)")
        self.lm.load_state_dict(model, strict=False)
        self.optimizer.load_state_dict({"per_layer": per_layer})
        if self.scheduler is not None and own["scheduler"] is not None:
            self.scheduler.load_state_dict(own["scheduler"])
        if self.scaler is not None and own["scaler"] is not None:
            self.scaler.load_state_dict(own["scaler"])
        if own["stage"] == 0 and self.stage.first:
            set_rng_state(own["rng"])  # the data pipeline's augmentation draws
        self.history = list(state["history"])
        self.best_top1 = state["best_top1"]
        self.elapsed = float(state["elapsed"])
        return int(state["next_epoch"]), int(state["next_step"]), state["epoch_stats"]

    # -- the run ----------------------------------------------------------------------------------------------
    def _announce(self) -> None:
        r = self.recipe
        self.reporter.message(
            f"[{self.rule}] {r.model.name} on {r.data.name}: {self.num_layers} local layers on "
            f"{len(self.placement.stages)} stages x {self.replicas} replica(s), {self.steps_per_epoch} "
            f"batches/epoch per replica")
        self.reporter.message(self.placement.describe())

    def _stop_agreed(self) -> bool:
        return self._any(self.stopper.stop_now)

    def _epoch_record(self, epoch: int, stats: Dict[str, Any]) -> Dict[str, Any]:
        return {**super()._epoch_record(epoch, stats), "placement": self.placement.stages}

    def _result(self, *, interrupted: bool) -> RunResult:
        if not interrupted and self.history:
            self._gather_weights()  # then rank 0 writes the one artifact, as a single-process run does
        return super()._result(interrupted=interrupted)

    def _gather_weights(self) -> None:
        """Rank 0 receives every stage's trained layers, so that its LocalModel is the whole trained model."""
        mine = self._my_state() if self.writes_part else None
        gathered: Optional[List[Any]] = [None] * dist.get_world_size() if self.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if self.is_main:
            merged: Dict[str, torch.Tensor] = {}
            for state in gathered:
                merged.update(state or {})
            self.lm.cpu()
            self.lm.load_state_dict(merged)
