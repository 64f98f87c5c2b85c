"""``auglocal zoo``: check that every torchvision classifier and every timm model family converts and trains.

A thin layer over :mod:`auglocal_fx.zoo` (the checks, the model lists and the report writers live there).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional, Tuple

import click

from ._options import option_callback, parse_input_size

__all__ = ["zoo_command"]


_input_size = option_callback(parse_input_size)


def _command_line() -> str:
    args = sys.argv[1:]
    return shlex.join(["auglocal"] + list(args))


@click.command("zoo", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--source", type=click.Choice(["all", "torchvision", "timm"]), default="all", show_default=True,
              help="Which library's models to check.")
@click.option("--filter", "filters", multiple=True, metavar="GLOB",
              help="Keep models whose name or timm family matches (repeatable); a glob naming other models adds them.")
@click.option("--input-size", callback=_input_size, metavar="C,H,W",
              help="Check every model at this input size instead of the smallest one it accepts.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the JSON report here (rewritten after every model, so a crash loses nothing).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the markdown report here at the end (docs/zoo.md).")
@click.option("--timeout", type=float, default=900.0, show_default=True, metavar="SECONDS",
              help="Time limit per model (isolated runs only).")
@click.option("--max-memory", type=float, default=None, metavar="GIB",
              help="Fail a model whose worker uses more memory than this (isolated runs only).")
@click.option("--resume", is_flag=True, help="Keep the results already in --json and check only the other models.")
@click.option("--retry-failed", is_flag=True, help="With --resume, check the models that failed again.")
@click.option("--no-isolate", is_flag=True, help="Run every model in this process instead of a forked worker each.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch intra-op threads per model.")
@click.option("--list", "list_only", is_flag=True, help="List the models that would be checked and exit.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any model fails.")
def zoo_command(
    source: str,
    filters: Tuple[str, ...],
    input_size: Optional[Tuple[int, int, int]],
    json_path: Optional[Path],
    markdown_path: Optional[Path],
    timeout: float,
    max_memory: Optional[float],
    resume: bool,
    retry_failed: bool,
    no_isolate: bool,
    threads: int,
    list_only: bool,
    strict: bool,
) -> None:
    """Convert every torchvision classifier and the smallest model of every timm family, and check each.

    Steps per model (random weights, small input): trace (units, cut points, largest K); convert with one layer
    per unit and with 4 layers; eval-mode equivalence with the original model; one local_step giving every
    parameter a gradient; save/load round trip. Prints one line per model and the pass rate per source.

    \b
    Examples:
      auglocal zoo --json benchmarks/zoo_report.json --markdown docs/zoo.md
      auglocal zoo --source timm --filter 'test_*'
      auglocal zoo --filter resnet18 --filter 'convnext*' --source torchvision
    """
    from auglocal_fx import zoo

    from ._render import make_console

    console = make_console()
    if resume and json_path is None:
        raise click.UsageError("--resume needs --json FILE (the report to resume)")
    if retry_failed and not resume:
        raise click.UsageError("--retry-failed goes with --resume")
    models = zoo.select_models(source, list(filters))
    if not models:
        raise click.UsageError(f"no {source} model matches the filters {list(filters)}")
    if list_only:
        for m in models:
            family = f"  ({m.family})" if m.family else ""
            console.print(f"{m.source:12s} {m.name}{family}", markup=False)
        console.print(f"{len(models)} models", markup=False)
        return

    width = len(str(len(models)))

    def on_result(result, index: int, total: int) -> None:
        label = f"{result.source} {result.name}" + (f" ({result.family})" if result.source == "timm" and result.family else "")
        if result.status == "fail":
            status = f"[red]FAIL[/red] {result.failed_step}: {_escape(result.reason or '')}"
        else:
            status = "[green]pass[/green]"
        console.print(f"[{index + 1:>{width}}/{total}] {_escape(label)}  {status}  {result.seconds:.1f} s", soft_wrap=True)

    report = zoo.run_zoo(
        models,
        json_path=json_path,
        input_size=input_size,
        isolate=not no_isolate,
        timeout=timeout,
        max_memory_gib=max_memory,
        resume=resume,
        retry_failed=retry_failed,
        threads=threads,
        command=_command_line(),
        on_result=on_result,
    )
    if markdown_path is not None:
        zoo.write_markdown(report, markdown_path)
    for name, s in report["summary"].items():
        console.print(
            f"{name}: {s['passed']}/{s['total']} passed ({100 * s['pass_rate']:.1f}%), {s['failed']} failed",
            markup=False,
        )
    console.print(f"wall time {report['wall_seconds']:.0f} s", markup=False)
    for path in (json_path, markdown_path):
        if path is not None:
            console.print(f"wrote {path}", markup=False)
    if strict and any(r["status"] == "fail" for r in report["results"]):
        sys.exit(1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
