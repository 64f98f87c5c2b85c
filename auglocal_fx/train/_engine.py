"""The training loop: AugLocal (``lm.local_step``) or end-to-end backprop (``lm.bp_step``) on the same model.

One run per rule, each in ``OUTPUT/<rule>/``::

    checkpoint.pt      every epoch (and on Ctrl-C), written atomically: model, optimizer, scheduler,
                       grad scaler, RNG states, metric history, position in the data
    metrics.csv/.jsonl one row per epoch: losses per layer, test top-1, accuracy of every aux net, lr, speed
    curves.png         test accuracy per epoch and layer-wise accuracy
    model/             the final artifact (auglocal_fx.save format), readable by `auglocal export`
    summary.json       the final figures

Resuming (``resume=True``) continues from ``checkpoint.pt`` to the same result as an uninterrupted run: the
data order is a function of (seed, epoch) and the RNG states are restored, so on CPU with
``deterministic: true`` and ``data.num_workers: 0`` the weights are bit-identical.

The first Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and stops; a second one aborts
at once (the last checkpoint on disk stays valid: it is replaced only by an atomic rename).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ._metrics import MetricsWriter
from ._progress import Reporter, format_losses
from ._recipe import Recipe, RecipeError, load_recipe

__all__ = ["train", "TrainResult", "RunResult", "TrainError", "CHECKPOINT_FILE", "ARTIFACT_DIR"]

CHECKPOINT_FILE = "checkpoint.pt"
ARTIFACT_DIR = "model"
_REFRESH_SECONDS = 0.5

# Recipe fields that may change between a run and its resumption: where things are, not what is trained.
_RESUMABLE_CHANGES = frozenset({
    "name", "description", "rule", "device", "num_threads", "output_dir", "compile", "eval_batch_size",
    "limit_eval_batches",
    "data.root", "data.download", "data.num_workers", "data.pin_memory",
})


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
    peak_mem_mb: Optional[float] = None
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


# ------------------------------------------------------------------------------------------------------------
# Public entry point

def train(
    recipe: Union[Recipe, str, Path, Mapping[str, Any]],
    *,
    overrides: Optional[Union[Sequence[str], Mapping[str, Any]]] = None,
    output_dir: Optional[Union[str, Path]] = None,
    resume: bool = False,
    quiet: bool = False,
    console: Optional[Any] = None,
    stop: Optional[threading.Event] = None,
) -> TrainResult:
    """Train a model as a recipe says, with AugLocal, backprop, or both one after the other.

    Args:
        recipe: a :class:`Recipe`, a YAML file, a shipped recipe's name (``"quickstart"``) or a mapping.
        overrides: ``["optimizer.lr=0.1", ...]`` or ``{"optimizer.lr": 0.1}``, applied before validation.
        output_dir: where the runs go; default: ``recipe.output_dir``, else ``runs/<recipe name>``.
        resume: continue from the checkpoints in ``output_dir`` (a rule without one starts afresh).
        quiet: show nothing (logging to ``auglocal_fx.train`` still happens).
        console: a ``rich.console.Console`` to draw on (default: a new one on stdout).
        stop: an event that, once set, stops training after the current step with a checkpoint
            (the result then has ``interrupted=True``).

    Returns:
        A :class:`TrainResult`; ``result["auglocal"].top1`` is the final test top-1 of the AugLocal run.

    Raises:
        RecipeError: the recipe is invalid (the field is named).
        TrainError: the output folder already holds a run (pass ``resume=True``), the loss diverged, ...
        KeyboardInterrupt: after Ctrl-C, once the checkpoint is written.
    """
    recipe = load_recipe(recipe, overrides=overrides)
    out = Path(output_dir or recipe.output_dir or Path("runs") / (recipe.name or "run")).expanduser()
    reporter = Reporter(quiet=quiet, console=console)
    if not resume:
        existing = [out / rule / CHECKPOINT_FILE for rule in recipe.rules if (out / rule / CHECKPOINT_FILE).exists()]
        if existing:
            raise TrainError(
                f"{existing[0].parent} already holds a run ({CHECKPOINT_FILE}); pass --resume (resume=True) to "
                "continue it, or choose another output folder with -o"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())

    runs: Dict[str, RunResult] = {}
    with _StopSignals(reporter, stop) as stopper, _global_settings(recipe):
        try:
            for rule in recipe.rules:
                result = _Run(recipe, rule, out / rule, reporter=reporter, stopper=stopper).run(resume=resume)
                runs[rule] = result
                if result.interrupted:
                    break
        finally:
            reporter.close()
    interrupted = any(r.interrupted for r in runs.values())
    result = TrainResult(recipe=recipe, output_dir=out, runs=runs, interrupted=interrupted)
    _finish(result, reporter)
    if interrupted and stopper.by_signal:
        raise KeyboardInterrupt(f"stopped with a checkpoint in {out}; run the same command with --resume to continue")
    return result


def _finish(result: TrainResult, reporter: Reporter) -> None:
    out = result.output_dir
    summary = {"recipe": result.recipe.name, "interrupted": result.interrupted,
               "runs": {rule: r.to_dict() for rule, r in result.runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if len(result.runs) > 1:
        from ._plots import plot_runs

        plot_runs({rule: r.history for rule, r in result.runs.items()}, out / "curves.png",
                  title=result.recipe.name or "")
    reporter.results_table([r.to_dict() for r in result.runs.values()],
                           title=f"{result.recipe.name or 'run'}" + (" (interrupted)" if result.interrupted else ""))
    if result.interrupted:
        reporter.message(f"stopped with a checkpoint in {out}; run the same command with --resume to continue "
                         "(train(..., resume=True) in Python)")


# ------------------------------------------------------------------------------------------------------------
# Process-wide settings and signals

@contextlib.contextmanager
def _global_settings(recipe: Recipe) -> Iterator[None]:
    """Deterministic-kernel settings for the run, restored afterwards (train() is a library call)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads())
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    if recipe.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.set_num_threads(saved[4])


class _StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step. Second: KeyboardInterrupt now."""

    def __init__(self, reporter: Reporter, event: Optional[threading.Event]) -> None:
        self.reporter = reporter
        self.event = event
        self.requested = False
        self.by_signal = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.by_signal:
            raise KeyboardInterrupt
        self.requested = self.by_signal = True
        self.reporter.warning("stopping after this step to write a checkpoint (Ctrl-C again to abort now)")

    @property
    def stop_now(self) -> bool:
        if not self.requested and self.event is not None and self.event.is_set():
            self.requested = True
        return self.requested


# ------------------------------------------------------------------------------------------------------------
# Building blocks

def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"recipe asks for device {name!r} but CUDA is not available here; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainError(f"recipe asks for device {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError("recipe asks for device 'mps' but MPS is not available here; use device: auto or cpu")
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class _Data:
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    num_classes: int
    in_chans: int
    img_size: int


def _build_data(recipe: Recipe, device: torch.device) -> _Data:
    from ..data import (create_dataset, create_loader, create_transforms, dataset_info, num_classes_of,
                        seeded_subset)

    d = recipe.data
    info = dataset_info(d.name)
    in_chans = info.in_chans
    img_size = d.img_size or info.img_size
    mean, std = list(d.mean or info.mean), list(d.std or info.std)
    for key, values in (("mean", mean), ("std", std)):
        if len(values) == 1 and in_chans > 1:
            values *= in_chans
        if len(values) != in_chans:
            raise RecipeError(f"recipe field 'data.{key}' has {len(values)} values but {d.name} images have "
                              f"{in_chans} channel(s)", field=f"data.{key}")
    augment = info.augment if d.augment == "auto" else d.augment
    common = dict(input_size=(in_chans, img_size, img_size), mean=mean, std=std, interpolation=d.interpolation,
                  crop_pct=d.crop_pct or info.crop_pct)
    native = info.img_size if d.name not in ("imagenet", "imagefolder") else None
    train_tf = create_transforms(is_training=True, augment=augment, native_size=native, auto_augment=d.auto_augment,
                                 re_prob=d.re_prob, **common)
    eval_tf = create_transforms(is_training=False, **common)
    where = dict(root=d.root, download=d.download, train_dir=d.train_dir, eval_dir=d.eval_dir)
    train_set = create_dataset(d.name, split="train", transform=train_tf, **where)
    eval_set = create_dataset(d.name, split="test", transform=eval_tf, **where)
    num_classes = info.num_classes or num_classes_of(train_set)
    train_set = seeded_subset(train_set, d.train_subset, seed=recipe.seed)
    eval_set = seeded_subset(eval_set, d.eval_subset, seed=recipe.seed)
    pin = device.type == "cuda" if d.pin_memory is None else d.pin_memory
    loader_args = dict(seed=recipe.seed, num_workers=d.num_workers, pin_memory=pin)
    return _Data(
        train_loader=create_loader(train_set, batch_size=recipe.batch_size, is_training=True, **loader_args),
        eval_loader=create_loader(eval_set, batch_size=recipe.eval_batch_size or recipe.batch_size,
                                  is_training=False, **loader_args),
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
    )


def _build_model(recipe: Recipe, data: _Data) -> nn.Module:
    from ..hub import create_model

    m = recipe.model
    kwargs = dict(m.kwargs)
    in_chans = m.in_chans or data.in_chans
    if in_chans != 3 or m.in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:
        return create_model(m.name, num_classes=m.num_classes or data.num_classes,
                            pretrained_file=m.pretrained_file, **kwargs)
    except TypeError as e:
        if "in_chans" in kwargs and "in_chans" in str(e):
            raise TrainError(f"model {m.name!r} does not take in_chans, and {recipe.data.name} images have "
                             f"{in_chans} channel(s): use an auglocal_fx or timm model (timm:NAME)") from None
        raise TrainError(f"cannot build model {m.name!r} with model.kwargs {m.kwargs}: {e}") from None


def _param_groups(params: Sequence[Tuple[str, List[nn.Parameter]]], *, weight_decay: float,
                  filter_bias_and_bn: bool) -> List[Dict[str, Any]]:
    """Named groups; with ``filter_bias_and_bn`` each splits into a decayed and a no-decay part (1-D tensors)."""
    groups = []
    for name, plist in params:
        plist = [p for p in plist if p.requires_grad]
        if not filter_bias_and_bn:
            groups.append({"name": name, "params": plist, "weight_decay": weight_decay})
            continue
        decay = [p for p in plist if p.ndim > 1]
        no_decay = [p for p in plist if p.ndim <= 1]
        groups.append({"name": name, "params": decay, "weight_decay": weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _build_optimizer(recipe: Recipe, lm: nn.Module, rule: str) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    o = recipe.optimizer
    if rule == "auglocal":
        named = [(g["name"], list(g["params"])) for g in lm.parameter_groups()]
    else:  # backprop never touches the aux nets: keep them out of the optimizer (and its memory)
        named = [("backbone", list(lm.backbone_parameters()))]
    groups = _param_groups(named, weight_decay=o.weight_decay, filter_bias_and_bn=o.filter_bias_and_bn)
    extra: Dict[str, Any] = {}
    if o.betas is not None:
        extra["betas"] = tuple(o.betas)
    if o.eps is not None:
        extra["eps"] = o.eps
    try:
        return create_optimizer_v2(groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   **extra)
    except TypeError as e:
        raise RecipeError(f"optimizer {o.name!r} does not accept these settings ({e}); remove optimizer.betas/eps "
                          "or pick another optimizer.name", field="optimizer") from None


def _build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer) -> Optional[Any]:
    from timm.scheduler import create_scheduler_v2

    s = recipe.schedule
    if s.name == "none":
        return None
    kwargs: Dict[str, Any] = dict(sched=s.name, num_epochs=recipe.epochs, warmup_epochs=s.warmup_epochs,
                                  warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay_rate=s.decay_rate)
    if s.decay_epochs is not None:
        kwargs["decay_epochs"] = s.decay_epochs
    if s.decay_milestones is not None:
        kwargs["decay_milestones"] = list(s.decay_milestones)
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs)
    return scheduler


def _recipe_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> List[str]:
    changes = []
    for key in sorted(set(saved) | set(current)):
        where = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "kwargs":
            changes += _recipe_changes(a, b, prefix=f"{where}.")
        elif a != b and where not in _RESUMABLE_CHANGES:
            changes.append(f"{where} ({a!r} -> {b!r})")
    return changes


# ------------------------------------------------------------------------------------------------------------
# One rule's run

class _Run:
    def __init__(self, recipe: Recipe, rule: str, run_dir: Path, *, reporter: Reporter, stopper: _StopSignals) -> None:
        self.recipe = recipe
        self.rule = rule
        self.run_dir = run_dir
        self.reporter = reporter
        self.stopper = stopper
        self.ckpt_path = run_dir / CHECKPOINT_FILE

    # -- setup --------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        import auglocal_fx

        r = self.recipe
        self.device = _resolve_device(r.device)
        _seed_everything(r.seed)
        self.data = _build_data(r, self.device)
        model = _build_model(r, self.data)
        c = r.convert
        input_size = tuple(c.input_size) if c.input_size else (self.data.in_chans, self.data.img_size,
                                                               self.data.img_size)
        self.lm = auglocal_fx.convert(model, layers=c.layers, aux_depth=c.aux_depth, pyramid=c.pyramid,
                                      aux_init=c.aux_init, input_size=input_size, cuts=c.cuts,
                                      leaf_modules=c.leaf_modules)
        del model
        self.num_layers = len(self.lm.layers)
        self.lm.to(self.device)
        if r.channels_last:
            self.lm.to(memory_format=torch.channels_last)
        self.optimizer = _build_optimizer(r, self.lm, self.rule)
        self.scheduler = _build_scheduler(r, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type) if r.amp == "fp16" else None
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
        self.metrics = MetricsWriter(self.run_dir)

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

    # -- state --------------------------------------------------------------------------------------------
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
            "best_top1": self.best_top1,
            "elapsed": self.elapsed,
            "plan": self.lm.plan.to_dict(),
        }

    def _save(self, **position: Any) -> None:
        save_checkpoint(self._state(**position), self.ckpt_path)

    def _restore(self) -> Tuple[int, int, Optional[Dict[str, Any]]]:
        state = load_checkpoint(self.ckpt_path)
        if state.get("rule") != self.rule:
            raise TrainError(f"{self.ckpt_path} is a {state.get('rule')!r} run, not {self.rule!r}")
        changes = _recipe_changes(state["recipe"], self.recipe.to_dict())
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
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.best_top1 = state["best_top1"]
        self.elapsed = float(state["elapsed"])
        return int(state["next_epoch"]), int(state["next_step"]), state["epoch_stats"]

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, *, resume: bool) -> RunResult:
        r = self.recipe
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
        if start_epoch == 0 and start_step == 0:
            self.reporter.message(
                f"[{self.rule}] {r.model.name} on {r.data.name}: {self.num_layers} local layers, "
                f"{sum(p.numel() for p in self.lm.backbone_parameters()):,} backbone + "
                f"{sum(p.numel() for p in self.lm.aux_parameters()):,} aux parameters, device {self.device}, "
                f"{self.steps_per_epoch} batches/epoch"
            )
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
                if self.stopper.stop_now and epoch + 1 < r.epochs:
                    interrupted = True
                    break
        finally:
            self.reporter.finish_task()
            self.metrics.close()
        return self._result(interrupted=interrupted)

    def _train_epoch(self, epoch: int, start_step: int, stats: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        from ..data import set_loader_epoch

        r = self.recipe
        loader = self.data.train_loader
        set_loader_epoch(loader, epoch, start_batch=start_step)
        # AugLocal has K losses (aux nets, then the head); backprop has one.
        num_losses = self.num_layers if self.rule == "auglocal" else 1
        stats = dict(stats) if stats else {"loss_sums": torch.zeros(num_losses, dtype=torch.float64),
                                            "samples": 0, "seconds": 0.0, "skipped": 0,
                                            "lr": self.optimizer.param_groups[0]["lr"]}
        loss_sums = stats["loss_sums"].to(self.device)
        samples = int(stats["samples"])
        skipped = int(stats["skipped"])
        seconds_before = float(stats["seconds"])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.lm.train()
        self.reporter.start(f"[{self.rule}] epoch {epoch + 1}/{r.epochs}", self.steps_per_epoch, completed=start_step)
        step = start_step
        t0 = time.perf_counter()
        last_refresh = 0.0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]

        def snapshot() -> Dict[str, Any]:
            return {"loss_sums": loss_sums.detach().cpu(), "samples": samples, "skipped": skipped,
                    "seconds": seconds_before + time.perf_counter() - t0, "lr": stats["lr"]}

        iterator = iter(loader)
        while step < self.steps_per_epoch:
            if self.stopper.stop_now:
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
                rate = (samples - int(stats["samples"])) / max(now - t0, 1e-9)
                losses_text = format_losses(current) if self.rule == "auglocal" else f"loss {current[0]:.3f}"
                self.reporter.update(step, info=f"{rate:,.0f} img/s  {losses_text}")
        self.reporter.finish_task()
        seconds = seconds_before + time.perf_counter() - t0
        self.elapsed += time.perf_counter() - t0
        if samples == 0:
            raise TrainError(f"epoch {epoch + 1} trained on no batch (all {skipped} fp16 steps overflowed); "
                             "lower optimizer.lr or use amp: bf16")
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return {"losses": (loss_sums / samples).tolist(), "samples": samples, "seconds": seconds,
                "skipped": skipped, "peak_mem_mb": peak, "lr": stats["lr"]}

    def _step(self, x: torch.Tensor, y: torch.Tensor, params: List[nn.Parameter]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            if self.rule == "auglocal":
                losses = torch.stack(self.lm.local_step(x, y, self.loss_fn, scaler=self.scaler))
            else:
                losses = self.lm.bp_step(x, y, self.loss_fn, scaler=self.scaler).reshape(1)
        if self.recipe.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.recipe.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return losses.float()

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
        limit = self.recipe.limit_eval_batches
        total = len(self.data.eval_loader) if limit is None else min(limit, len(self.data.eval_loader))
        layerwise = self.rule == "auglocal"
        correct = torch.zeros(self.num_layers if layerwise else 1, dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        self.reporter.start(f"[{self.rule}] evaluating", total)
        for i, (x, y) in enumerate(self.data.eval_loader):
            if i >= total:
                break
            x, y = self._to_device(x, y)
            with self._autocast():
                outputs = self.lm.layerwise_logits(x) if layerwise else [self.lm(x)]
            for k, logits in enumerate(outputs):
                correct[k] += (logits.argmax(dim=1) == y).sum()
            loss_sum += F.cross_entropy(outputs[-1].float(), y, reduction="sum").double()
            n += y.shape[0]
            self.reporter.update(i + 1)
        self.reporter.finish_task()
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
            "train_layer_loss": losses if self.rule == "auglocal" else None,
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
        if not interrupted and self.history:
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
            interrupted=interrupted,
            history=list(self.history),
        )
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
