"""``auglocal train RECIPE``: a thin click layer over :func:`auglocal_fx.train.train`.

Exit codes: 0 done; 1 a recipe, data or training error (one ``Error:`` line); 2 a usage error (an unknown
recipe name, a malformed ``--set``); 130 stopped by Ctrl-C (after writing a checkpoint).

Data-parallel: ``--nproc-per-node N`` starts N workers on this machine (torch's elastic launcher, as torchrun
does); under torchrun (``RANK``/``WORLD_SIZE`` set) this command is one worker, and its error line names its
rank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import click

from ._errors import is_debug, one_line

__all__ = ["train_command"]


@click.command("train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("recipe", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set optimizer.lr=0.1 --set rule=bp (repeatable; YAML values).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its last checkpoint.")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: the recipe's output_dir, else runs/<recipe name>].")
@click.option("--dry-run", is_flag=True, help="Validate the recipe, print it resolved, and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Only the final figures: no progress bar, epoch lines or table.")
@click.option("--nproc-per-node", "nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Data-parallel training on N worker processes on this machine (one per GPU; gloo on CPU). "
                   "batch_size stays the global batch. Across machines: torchrun ... -m auglocal_fx train.")
def train_command(recipe: str, overrides: Sequence[str], resume: bool, output: Optional[Path], dry_run: bool,
                  quiet: bool, nproc: Optional[int]) -> None:
    """Train a model as RECIPE says: with a local rule (AugLocal, DGL, PredSim, InfoPro, greedy), end-to-end
    backprop, or several in turn on the same data, seed and budget, ending with one comparison table.

    RECIPE is a YAML file or the name of a shipped recipe: quickstart, fashion_mnist, compare_fashion_mnist,
    resnet32_cifar10, resnet110_cifar10, resnet34_imagenet, finetune_timm.

    \b
    Examples:
      auglocal train quickstart
      auglocal train fashion_mnist --set 'rule=[bp,auglocal,dgl,predsim,infopro,greedy]'
      auglocal train fashion_mnist --set epochs=5 -o runs/fm
      auglocal train resnet32_cifar10 --set data.root=~/data --resume -o runs/r32
      auglocal train resnet32_cifar10 --nproc-per-node 4 -o runs/r32-dp4
    """
    from auglocal_fx.hub import PretrainedWeightsError
    from auglocal_fx.train import RecipeError, load_recipe, parse_overrides, train
    from auglocal_fx.train._recipe import list_recipes

    try:
        pairs = parse_overrides(overrides)
    except RecipeError as exc:
        raise click.BadParameter(one_line(exc), param_hint="'--set'") from None
    path = Path(recipe).expanduser()
    if not path.is_file():
        name = recipe[:-5] if recipe.endswith(".yaml") else recipe
        if "/" in recipe or name not in list_recipes():
            raise click.BadParameter(
                f"{recipe!r} is neither a file nor a shipped recipe ({', '.join(list_recipes())})",
                param_hint="'RECIPE'",
            )
    try:
        loaded = load_recipe(recipe, overrides=pairs)
    except RecipeError as exc:
        raise click.ClickException(one_line(exc)) from None
    if dry_run:
        click.echo(loaded.to_yaml(), nl=False)
        return
    if nproc is not None:
        if loaded.batch_size % nproc:  # the workers would say the same, each, after starting up
            raise click.ClickException(
                f"recipe field 'batch_size' ({loaded.batch_size}) is the global batch and must divide among the "
                f"{nproc} ranks; use a multiple of {nproc}")
        _launch(recipe, overrides, resume=resume, output=output, quiet=quiet, nproc=nproc)
        return

    from rich.console import Console

    rank = _worker_rank()
    try:
        result = train(loaded, output_dir=output, resume=resume, quiet=quiet, console=Console())
    except KeyboardInterrupt as exc:
        if not str(exc):  # a second Ctrl-C: aborted between checkpoints
            click.echo("Aborted: the last checkpoint written is kept; run the same command with --resume", err=True)
        elif quiet:  # otherwise the engine has said it already
            click.echo(f"Interrupted: {exc}", err=True)
        sys.exit(130)
    except Exception as exc:  # one readable line, exit 1; --debug (or AUGLOCAL_DEBUG=1) shows the traceback
        if is_debug():
            raise
        if isinstance(exc, PretrainedWeightsError):  # the offline way, in a recipe's words
            exc = exc.with_file_hint("model.pretrained_file: PATH instead of model.pretrained")
        if rank is not None:  # one worker of several: say which, and whether another rank's failure caused it
            from auglocal_fx.distributed import describe_failure

            raise click.ClickException(f"rank {rank}: {describe_failure(exc)}") from exc
        raise click.ClickException(one_line(exc)) from exc
    if quiet:
        for run in result.runs.values():
            top1 = "-" if run.top1 is None else f"{run.top1:.2f}%"
            best = "-" if run.best_top1 is None else f"{run.best_top1:.2f}%"
            click.echo(f"{run.rule}: test top-1 {top1} (best {best}), {run.epochs} epochs, {run.seconds:.1f}s, "
                       f"{run.run_dir}")
    if result.interrupted:
        sys.exit(130)


def _worker_rank() -> Optional[int]:
    """This process's rank when it is one worker of a multi-process job (torchrun's environment), else None."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or not world.isdigit() or int(world) < 2:
        return None
    return int(os.environ.get("RANK", "0"))


def _launch(recipe: str, overrides: Sequence[str], *, resume: bool, output: Optional[Path], quiet: bool,
            nproc: int) -> None:
    """Start ``nproc`` workers running this command without ``--nproc-per-node``; exit as they did."""
    if _worker_rank() is not None:
        raise click.UsageError("--nproc-per-node starts the workers itself; under torchrun, leave it out")
    from auglocal_fx.distributed._launch import LaunchFailure, launch_local

    argv = ["train", recipe, *(f"--set={item}" for item in overrides)]
    argv += (["--resume"] if resume else []) + (["-o", str(output)] if output is not None else [])
    argv += ["-q"] if quiet else []
    try:
        launch_local(argv, nproc_per_node=nproc)
    except LaunchFailure as exc:
        click.echo(f"{'Interrupted' if exc.exit_code == 130 else 'Error'}: {exc}", err=True)
        sys.exit(exc.exit_code)
