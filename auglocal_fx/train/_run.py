"""One rule's run: set up from the recipe, train epoch by epoch with checkpoints, evaluate, write the artifact.

Data-parallel (``ctx.distributed``): every rank runs this same code on its shard of each global batch; each
layer's gradients are averaged over the ranks as its backward ends (``LayerGradSync``); the ranks agree on
stopping after every step; evaluation is sharded and its counts summed; rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed._context import DistContext, single_process
from ..distributed._ops import agree, rank_seed, sum_over_ranks
from ..distributed._pipeline import train_layers
from ..optim import PerLayerOptimizer
from ..rules import DEFAULT_RULE
from ._memory import peak_memory_mb, reset_peak_memory
from ._metrics import MetricsWriter
from ._progress import Reporter, format_losses
from ._recipe import BACKPROP, Recipe
from ._results import RunResult, TrainError
from ._setup import build_data, build_model, build_optimizer, build_scheduler, resolve_device, seed_everything
from ._run_state import CheckpointState
from ._signals import StopSignals

__all__ = ["Run", "CHECKPOINT_FILE", "ARTIFACT_DIR"]

CHECKPOINT_FILE = "checkpoint.pt"
ARTIFACT_DIR = "model"
_REFRESH_SECONDS = 0.5

class Run(CheckpointState):
    def __init__(self, recipe: Recipe, rule: str, run_dir: Path, *, reporter: Reporter, stopper: StopSignals,
                 ctx: Optional[DistContext] = None) -> None:
        self.ctx = ctx or single_process()
        self.recipe = recipe
        self.rule = rule
        self.run_dir = run_dir
        self.reporter = reporter
        self.stopper = stopper
        self.ckpt_path = run_dir / CHECKPOINT_FILE
        self.local = rule != BACKPROP  # a local-learning rule: K losses, layer-wise accuracy
        self.resuming = False

    # -- setup --------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        import auglocal_fx

        r = self.recipe
        ctx = self.ctx
        self.device = ctx.device if ctx.distributed else resolve_device(r.device)
        seed_everything(r.seed)
        self.data = build_data(r, self.device, num_replicas=ctx.world_size if ctx.distributed else 1,
                               rank=ctx.rank if ctx.distributed else 0)
        model = build_model(r, self.data, resuming=self.resuming)
        c = r.convert
        input_size = tuple(c.input_size) if c.input_size else (self.data.in_chans, self.data.img_size,
                                                               self.data.img_size)
        # Backprop trains the same layers; its model is converted with the default rule and ignores the aux nets.
        rule = self.rule if self.local else DEFAULT_RULE
        self.lm = auglocal_fx.convert(model, layers=c.layers, aux_depth=c.aux_depth, pyramid=c.pyramid,
                                      aux_init=c.aux_init, input_size=input_size, cuts=c.cuts,
                                      leaf_modules=c.leaf_modules, rule=rule,
                                      rule_options=c.rule_options.get(rule))
        del model
        self.num_layers = len(self.lm.layers)
        self.lm.to(self.device)
        if r.channels_last:
            self.lm.to(memory_format=torch.channels_last)
        self.sync = None
        if ctx.initialized:  # any job, even of one rank: the NCCL/gloo path runs as it will on N
            from ..distributed._grad_sync import LayerGradSync

            if r.sync_bn:  # checked against the device when the recipe was validated for this job
                for i, module in enumerate(self.lm.layers):
                    self.lm.layers[i] = nn.SyncBatchNorm.convert_sync_batchnorm(module)
                for i, module in enumerate(self.lm.aux):
                    self.lm.aux[i] = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self.sync = LayerGradSync(self.lm, bucket_cap_mb=r.bucket_cap_mb)
            self.sync.broadcast_parameters()  # one model on every rank, whatever each built
            # Each rank's augmentation and dropout draw from a stream of their own; rank 0 keeps a plain run's.
            seed_everything(rank_seed(r.seed, ctx.rank))
        self.scaler = torch.amp.GradScaler(self.device.type) if r.amp == "fp16" else None
        self.optimizer = build_optimizer(r, self.lm, self.rule, before_step=self._before_layer_step,
                                         scaler=self.scaler, reducer=self.sync)
        self.per_layer = isinstance(self.optimizer, PerLayerOptimizer)
        self.scheduler = build_scheduler(r, self.optimizer)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp)
        self.loss_fn = (nn.CrossEntropyLoss(label_smoothing=r.label_smoothing) if r.label_smoothing > 0
                        else F.cross_entropy)
        if r.compile:
            # nn.Module.compile() compiles in place: parameter names and state_dict keys stay the same.
            for module in list(self.lm.layers) + list(self.lm.aux):
                module.compile()
        train_batches = len(self.data.train_loader)
        if train_batches == 0:
            raise TrainError(f"the training set has fewer samples than batch_size ({r.batch_size}); lower batch_size")
        self.steps_per_epoch = min(train_batches, r.limit_train_batches or train_batches)
        self.metrics = MetricsWriter(self.run_dir) if ctx.is_main else NoMetrics()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=non_blocking)
        if self.recipe.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=non_blocking)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, *, resume: bool) -> RunResult:
        r = self.recipe
        self.resuming = resume and self.ckpt_path.exists()  # then the checkpoint gives the starting weights
        self._setup()
        self.history: List[Dict[str, Any]] = []
        self.best_top1: Optional[float] = None
        self.elapsed = 0.0
        start_epoch, start_step, epoch_stats = 0, 0, None
        if resume and self.ckpt_path.exists():
            start_epoch, start_step, epoch_stats = self._restore()
            where = f"epoch {start_epoch + 1}" + (f", batch {start_step + 1}" if start_step else "")
            if start_epoch < r.epochs:
                self.reporter.message(f"[{self.rule}] resuming {self.ckpt_path} at {where}")
        elif resume:
            self.reporter.message(f"[{self.rule}] no checkpoint in {self.run_dir}: starting a new run")
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
        if start_epoch == 0 and start_step == 0:
            self._announce()
        if self.scheduler is not None:
            self.scheduler.step(start_epoch)

        interrupted = False
        try:
            for epoch in range(start_epoch, r.epochs):
                stats = self._train_epoch(epoch, start_step if epoch == start_epoch else 0,
                                          epoch_stats if epoch == start_epoch else None)
                if stats is None:  # stopped mid-epoch; the checkpoint is written
                    interrupted = True
                    break
                if self.scheduler is not None:
                    self.scheduler.step(epoch + 1)
                record = self._epoch_record(epoch, stats)
                self.history.append(record)
                self.metrics.write(self.history)
                self.reporter.epoch_line(record, epochs=r.epochs)
                self._save(next_epoch=epoch + 1, next_step=0, epoch_stats=None)
                if self._stop_agreed() and epoch + 1 < r.epochs:
                    interrupted = True
                    break
        finally:
            self.reporter.finish_task()
            self.metrics.close()
        return self._result(interrupted=interrupted)

    def _announce(self) -> None:
        """The line that starts a new run: what is trained, where, and how many batches an epoch has."""
        r = self.recipe
        where = (f"{self.ctx.world_size} ranks ({self.ctx.backend}, {self.device.type}), "
                 f"{r.batch_size // self.ctx.world_size} images each per batch" if self.ctx.distributed
                 else f"device {self.device}")
        backbone = f"{sum(p.numel() for p in self.lm.backbone_parameters()):,} backbone"
        what = (f"{self.num_layers} local layers, {backbone} + "
                f"{sum(p.numel() for p in self.lm.aux_parameters()):,} aux parameters" if self.local
                else f"end-to-end backprop through the same {self.num_layers} layers, {backbone} parameters")
        self.reporter.message(f"[{self.rule}] {r.model.name} on {r.data.name}: {what}, {where}, "
                              f"{self.steps_per_epoch} batches/epoch")

    def _train_epoch(self, epoch: int, start_step: int, stats: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        from ..data import set_loader_epoch

        r = self.recipe
        loader = self.data.train_loader
        set_loader_epoch(loader, epoch, start_batch=start_step)
        # A local rule has K losses (aux nets, then the head); backprop has one.
        num_losses = self.num_layers if self.local else 1
        stats = dict(stats) if stats else {"loss_sums": torch.zeros(num_losses, dtype=torch.float64),
                                            "samples": 0, "seconds": 0.0, "skipped": 0,
                                            "lr": self.optimizer.param_groups[0]["lr"]}
        if not self.ctx.is_main:  # the saved sums are over every rank: rank 0 carries them on alone
            stats.update(loss_sums=torch.zeros(num_losses, dtype=torch.float64), samples=0, skipped=0)
        loss_sums = stats["loss_sums"].to(self.device)
        samples = int(stats["samples"])
        skipped = int(stats["skipped"])
        seconds_before = float(stats["seconds"])
        reset_peak_memory(self.device)
        self.lm.train()
        self.reporter.start(f"[{self.rule}] epoch {epoch + 1}/{r.epochs}", self.steps_per_epoch, completed=start_step)
        step = start_step
        t0 = time.perf_counter()
        last_refresh = 0.0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]

        def snapshot() -> Dict[str, Any]:
            counts = sum_over_ranks(self.ctx, torch.tensor([samples, skipped], dtype=torch.float64))
            return {"loss_sums": sum_over_ranks(self.ctx, loss_sums.detach()).cpu(), "samples": int(counts[0]),
                    "skipped": int(counts[1]), "seconds": seconds_before + time.perf_counter() - t0,
                    "lr": stats["lr"]}

        iterator = iter(loader)
        while step < self.steps_per_epoch:
            if self._stop_agreed():
                state = snapshot()
                self.elapsed += time.perf_counter() - t0
                self._save(next_epoch=epoch, next_step=step, epoch_stats=state)
                return None
            try:
                x, y = next(iterator)
            except StopIteration:
                break
            except RuntimeError:
                if self.stopper.stop_now:  # a DataLoader worker died of the same Ctrl-C
                    continue
                raise
            x, y = self._to_device(x, y)
            self.global_step = epoch * self.steps_per_epoch + step  # names the per-layer random streams
            losses = self._step(x, y, params)
            batch = y.shape[0]
            finite = torch.isfinite(losses)
            if self.scaler is not None:
                # fp16: the grad scaler skips steps that overflowed; keep them out of the averages.
                ok = bool(finite.all())  # one sync per step only in fp16 mode
                if not ok:
                    skipped += 1
                    step += 1
                    continue
            loss_sums += losses.double() * batch
            samples += batch
            step += 1
            now = time.perf_counter()
            if now - last_refresh >= _REFRESH_SECONDS or step == self.steps_per_epoch:
                last_refresh = now
                current = (loss_sums / max(samples, 1)).tolist()
                self._check_finite(current, epoch, step)
                rate = (samples - int(stats["samples"])) * self.ctx.world_size / max(now - t0, 1e-9)
                losses_text = format_losses(current) if self.local else f"loss {current[0]:.3f}"
                self.reporter.update(step, info=f"{rate:,.0f} img/s  {losses_text}")
        self.reporter.finish_task()
        seconds = seconds_before + time.perf_counter() - t0
        self.elapsed += time.perf_counter() - t0
        if self.ctx.distributed:  # the epoch's figures are over every rank's samples
            state = snapshot()
            loss_sums, samples, skipped = state["loss_sums"], state["samples"], state["skipped"]
        if samples == 0:
            raise TrainError(f"epoch {epoch + 1} trained on no batch (all {skipped} fp16 steps overflowed); "
                             "lower optimizer.lr or use amp: bf16")
        peak = peak_memory_mb(self.device)
        return {"losses": (loss_sums.cpu() / samples).tolist(), "samples": samples, "seconds": seconds,
                "skipped": skipped, "peak_mem_mb": peak, "lr": stats["lr"]}

    def _step(self, x: torch.Tensor, y: torch.Tensor, params: List[nn.Parameter]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_layer:
            # Each layer steps after its own backward, its dropout drawing from the stream of (seed, step, layer):
            # exactly what a layer-parallel stage computes (distributed._pipeline), so the two runs agree.
            _, layer_losses = train_layers(
                self.lm, range(self.num_layers), x, y, step=self.global_step, seed=self.recipe.seed,
                optimizer=self.optimizer, loss_fn=self.loss_fn, scaler=self.scaler,
                inputs=x if self.lm.rule.needs_input else None, mean=self.data.mean, std=self.data.std,
                autocast=self._autocast)
            losses = torch.stack(layer_losses)
            if self.sync is not None:
                self.optimizer.finish()  # the layers whose all-reduce was still in flight step now
        else:
            with self._autocast():
                if self.local:
                    after = self.sync.launch if self.sync is not None else None
                    losses = torch.stack(self.lm.local_step(x, y, self.loss_fn, scaler=self.scaler,
                                                            after_backward=after, mean=self.data.mean,
                                                            std=self.data.std))
                else:
                    losses = self.lm.bp_step(x, y, self.loss_fn, scaler=self.scaler).reshape(1)
            if self.sync is not None:
                if self.local:
                    self.sync.wait_all()
                else:
                    self.sync.all_layers()  # backprop: one backward through everything, then one all-reduce
            self._clip(self.optimizer, params)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        return losses.float()

    def _stop_agreed(self) -> bool:
        """Whether to stop now: on every rank at once (a Ctrl-C that reached one rank stops them all)."""
        return agree(self.ctx, self.stopper.stop_now)

    def _before_layer_step(self, k: int, params: List[nn.Parameter]) -> None:
        """Per-layer optimizer: layer ``k`` has all its gradients; clip them (per layer) before it steps."""
        self._clip(self.optimizer.optimizers[k], params)

    def _clip(self, optimizer: Optional[torch.optim.Optimizer], params: List[nn.Parameter]) -> None:
        if self.recipe.grad_clip is None or optimizer is None:
            return
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.recipe.grad_clip)

    def _check_finite(self, losses: List[float], epoch: int, step: int) -> None:
        bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise TrainError(
                f"[{self.rule}] the loss of layer {bad[0]} is {losses[bad[0]]} at epoch {epoch + 1}, batch {step}: "
                "training diverged. Lower optimizer.lr, add schedule.warmup_epochs or set grad_clip; the last "
                f"good checkpoint is {self.ckpt_path}"
            )

    @torch.no_grad()
    def _evaluate(self) -> Dict[str, Any]:
        self.lm.eval()
        total = len(self.data.eval_loader)  # limit_eval_batches is applied by the (sharded) sampler
        layerwise = self.local
        correct = torch.zeros(self.num_layers if layerwise else 1, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        self.reporter.start(f"[{self.rule}] evaluating", total)
        for i, (x, y) in enumerate(self.data.eval_loader):
            x, y = self._to_device(x, y)
            with self._autocast():
                outputs = self.lm.layerwise_logits(x) if layerwise else [self.lm(x)]
            for k, logits in enumerate(outputs):
                correct[k] += (logits.argmax(dim=1) == y).sum()
            loss_sum += F.cross_entropy(outputs[-1].float(), y, reduction="sum").double()
            n += y.shape[0]
            self.reporter.update(i + 1)
        self.reporter.finish_task()
        if self.ctx.distributed:  # each rank evaluated its shard: sum the counts (no sample is counted twice)
            totals = sum_over_ranks(self.ctx, torch.cat([correct, loss_sum.reshape(1),
                                                         torch.tensor([n], dtype=torch.float64, device=self.device)]))
            correct, loss_sum, n = totals[:-2], totals[-2], int(totals[-1])
        acc = (correct * 100.0 / max(n, 1)).tolist()
        return {"eval_top1": acc[-1], "eval_loss": float(loss_sum) / max(n, 1),
                "layer_acc": acc if layerwise else None, "eval_samples": n}

    def _epoch_record(self, epoch: int, stats: Dict[str, Any]) -> Dict[str, Any]:
        r = self.recipe
        evaluate = (epoch + 1) % r.eval_every == 0 or epoch + 1 == r.epochs
        ev = self._evaluate() if evaluate else {"eval_top1": None, "eval_loss": None, "layer_acc": None,
                                                "eval_samples": 0}
        if ev["eval_top1"] is not None:
            self.best_top1 = ev["eval_top1"] if self.best_top1 is None else max(self.best_top1, ev["eval_top1"])
        losses = stats["losses"]
        return {
            "epoch": epoch + 1,
            "rule": self.rule,
            "lr": stats["lr"],
            "train_loss": losses[-1],
            "train_layer_loss": losses if self.local else None,
            "eval_top1": ev["eval_top1"],
            "best_top1": self.best_top1,
            "eval_loss": ev["eval_loss"],
            "layer_acc": ev["layer_acc"],
            "train_samples": stats["samples"],
            "skipped_steps": stats["skipped"],
            "epoch_time": stats["seconds"],
            "train_throughput": stats["samples"] / max(stats["seconds"], 1e-9),
            "peak_mem_mb": stats["peak_mem_mb"],
            "elapsed": self.elapsed,
        }

    # -- the end ------------------------------------------------------------------------------------------
    def _result(self, *, interrupted: bool) -> RunResult:
        last = next((h for h in reversed(self.history) if h.get("eval_top1") is not None), None)
        artifact = None
        if not interrupted and self.history and self.ctx.is_main:
            from ._plots import plot_runs

            plot_runs({self.rule: self.history}, self.run_dir / "curves.png",
                      title=f"{self.recipe.name or ''} [{self.rule}]")
            artifact = self._save_artifact()
        peaks = [h["peak_mem_mb"] for h in self.history if h.get("peak_mem_mb")]
        result = RunResult(
            rule=self.rule,
            run_dir=self.run_dir,
            epochs=len(self.history),
            top1=last["eval_top1"] if last else None,
            best_top1=self.best_top1,
            layer_acc=last["layer_acc"] if last else None,
            seconds=self.elapsed,
            artifact=artifact,
            peak_mem_mb=max(peaks) if peaks else None,
            aux_params=sum(p.numel() for p in self.lm.aux_parameters()) if self.local else 0,
            aux_flops=sum(a.flops for a in self.lm.plan.aux) if self.local else 0,
            interrupted=interrupted,
            history=list(self.history),
        )
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        return result

    def _save_artifact(self) -> Optional[Path]:
        from ..io import save  # written alongside; imported late so training never depends on it to start

        target = self.run_dir / ARTIFACT_DIR
        try:
            save(self.lm, target, overwrite=True)
        except (ValueError, TypeError, OSError) as e:
            self.reporter.warning(f"[{self.rule}] could not write the model artifact ({e}); the trained weights are "
                                  f"in {self.ckpt_path}")
            return None
        return target


class NoMetrics:
    """The metrics writer of ranks other than 0: they write nothing."""

    def write(self, history: Any) -> None:
        pass

    def close(self) -> None:
        pass
