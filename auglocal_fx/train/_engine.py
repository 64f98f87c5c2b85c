"""Training entry point: each rule of the recipe in turn (a local-learning rule's ``lm.local_step``, or end-to-end
backprop's ``lm.bp_step``) on the same model, data, seed and budget; the runs themselves are in ``_run.py``.

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
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..distributed._context import (DistContext, current_context, destroy, fail_together, in_job, init_distributed,
                                    single_process)
from ._pipeline_run import PipelineRun
from ._progress import Reporter, comparison_markdown
from ._recipe import Recipe, RecipeError, load_recipe
from ._results import RunResult, TrainError, TrainResult
from ._run import ARTIFACT_DIR, CHECKPOINT_FILE, Run
from ._signals import StopSignals

__all__ = ["train", "TrainResult", "RunResult", "TrainError", "CHECKPOINT_FILE", "ARTIFACT_DIR"]


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
    ctx, owned = _join_job(recipe)
    try:
        with fail_together(ctx):
            return _train(recipe, ctx, output_dir=output_dir, resume=resume, quiet=quiet, console=console, stop=stop)
    finally:
        if owned:
            destroy(ctx)


def _join_job(recipe: Recipe) -> "tuple[DistContext, bool]":
    """(context, whether train() set it up): the job torchrun started, a process group already there, or none."""
    device = recipe.device
    if not in_job() and not _dist_initialized():
        if recipe.sync_bn and _resolved_type(device) != "cuda":
            raise RecipeError("recipe field 'sync_bn' needs CUDA (SyncBatchNorm runs on NCCL); torch cannot do it on "
                              f"{_resolved_type(device)}: set sync_bn: false", field="sync_bn")
        return single_process(), False
    if device.startswith("cuda:") or device == "mps":
        raise RecipeError(f"recipe field 'device' is {device!r}, but each rank of a distributed run uses its own "
                          "device (cuda:LOCAL_RANK, or the CPU): set device: auto, cuda or cpu", field="device")
    if _dist_initialized():
        ctx, owned = current_context(timeout_s=recipe.dist_timeout), False
    else:
        ctx, owned = init_distributed(device_type=device, timeout_s=recipe.dist_timeout), True
    if recipe.sync_bn and ctx.device.type != "cuda":
        if owned:
            destroy(ctx)
        raise RecipeError("recipe field 'sync_bn' needs CUDA (SyncBatchNorm runs on NCCL); torch cannot do it on "
                          "CPU with gloo: set sync_bn: false", field="sync_bn")
    return ctx, owned


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _resolved_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _train(recipe: Recipe, ctx: DistContext, *, output_dir: Optional[Union[str, Path]], resume: bool, quiet: bool,
           console: Optional[Any], stop: Optional[threading.Event]) -> TrainResult:
    out = Path(output_dir or recipe.output_dir or Path("runs") / (recipe.name or "run")).expanduser()
    reporter = Reporter(quiet=quiet or not ctx.is_main, console=console)
    if not resume:
        existing = [out / rule / CHECKPOINT_FILE for rule in recipe.rules if (out / rule / CHECKPOINT_FILE).exists()]
        if existing:
            raise TrainError(
                f"{existing[0].parent} already holds a run ({CHECKPOINT_FILE}); pass --resume (resume=True) to "
                "continue it, or choose another output folder with -o"
            )
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())

    runs: Dict[str, RunResult] = {}
    with StopSignals(reporter, stop) as stopper, _global_settings(recipe):
        try:
            for rule in recipe.rules:
                # parallel.stages > 1: layer-parallel stages, one contiguous group of local layers per process
                runner = Run if recipe.parallel.stages == 1 else PipelineRun
                result = runner(recipe, rule, out / rule, reporter=reporter, stopper=stopper, ctx=ctx).run(resume=resume)
                runs[rule] = result
                if result.interrupted:
                    break
        finally:
            reporter.close()
    interrupted = any(r.interrupted for r in runs.values())
    result = TrainResult(recipe=recipe, output_dir=out, runs=runs, interrupted=interrupted)
    if ctx.is_main:
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
        rows = [r.to_dict() for r in result.runs.values()]
        (out / "comparison.md").write_text(comparison_markdown(rows))
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
