"""``auglocal train RECIPE``: a thin click layer over :func:`auglocal_fx.train.train`.

Exit codes: 0 done; 1 a recipe, data or training error (one ``Error:`` line); 2 a usage error (an unknown
recipe name, a malformed ``--set``); 130 stopped by Ctrl-C (after writing a checkpoint).
"""
from __future__ import annotations

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
def train_command(recipe: str, overrides: Sequence[str], resume: bool, output: Optional[Path], dry_run: bool,
                  quiet: bool) -> None:
    """Train a model as RECIPE says: AugLocal, end-to-end backprop, or both side by side.

    RECIPE is a YAML file or the name of a shipped recipe: quickstart, fashion_mnist, resnet32_cifar10,
    resnet110_cifar10, resnet34_imagenet, finetune_timm.

    \b
    Examples:
      auglocal train quickstart
      auglocal train fashion_mnist --set epochs=5 -o runs/fm
      auglocal train resnet32_cifar10 --set data.root=~/data --resume -o runs/r32
    """
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

    from rich.console import Console

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
        raise click.ClickException(one_line(exc)) from exc
    if quiet:
        for run in result.runs.values():
            top1 = "-" if run.top1 is None else f"{run.top1:.2f}%"
            best = "-" if run.best_top1 is None else f"{run.best_top1:.2f}%"
            click.echo(f"{run.rule}: test top-1 {top1} (best {best}), {run.epochs} epochs, {run.seconds:.1f}s, "
                       f"{run.run_dir}")
    if result.interrupted:
        sys.exit(130)
