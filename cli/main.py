"""The ``auglocal`` command line: a thin click layer over the Python API.

Commands here: ``convert``, ``inspect``, ``export``. Optional commands written in sibling modules (``train``,
``zoo``, ``bench``/``plan``) are added when their module is present. Heavy imports (torch, timm) happen inside the
commands so that ``auglocal --help`` and ``--version`` answer at once.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from ._errors import AuglocalGroup
from ._options import option_callback, parse_cuts, parse_input_size, rule_choice_options

__all__ = ["main", "parse_input_size", "parse_cuts"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _dist_version(dist: str) -> str:
    from .._versions import package_version  # importlib.metadata: only --version needs it

    return package_version(dist, "auglocal_fx" if dist == "auglocal-fx" else None) or "not installed"


def _print_version(ctx: click.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit()


def _version_message() -> str:
    return (
        f"auglocal-fx {_dist_version('auglocal-fx')} (torch {_dist_version('torch')}, "
        f"torchvision {_dist_version('torchvision')}, timm {_dist_version('timm')}, Python {sys.version.split()[0]})"
    )


@click.group(cls=AuglocalGroup, context_settings=_CONTEXT)
@click.option("--version", "-V", is_flag=True, expose_value=False, is_eager=True, callback=lambda ctx, _p, v: _print_version(ctx, v),
              help="Show the versions of auglocal-fx, torch, torchvision, timm and exit.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also accepted after the command).")
def main(debug: bool = False) -> None:
    """auglocal-fx: turn any PyTorch vision model into an AugLocal local-learning model.

    MODEL names: a torchvision or timm name (a plain name that both know is torchvision's; write timm:NAME or
    tv:NAME to choose), auglocal:NAME for auglocal-fx's own models (the paper's CIFAR ResNets), or
    package.module:factory for your own model.

    \b
    Examples:
      auglocal convert resnet50 --layers 17 -o r50-k17
      auglocal inspect timm:vit_small_patch16_224
      auglocal export r50-k17 -o resnet50.safetensors
    """


# ------------------------------------------------------------------------------------------------ option parsing


_input_size_option = option_callback(parse_input_size)
_cuts_option = option_callback(parse_cuts)


def _leaf_modules(values: Sequence[str]) -> Optional[List[str]]:
    """``--leaf`` values: a class name used by the model, a submodule name, or an importable ``pkg.mod.Class``.

    Importable classes are checked and passed by class name, which keeps the plan JSON-able.
    """
    if not values:
        return None
    import torch.nn as nn

    leaves = []
    for value in values:
        module_name, sep, attr = value.replace(":", ".").rpartition(".")
        if sep and attr.isidentifier() and attr[:1].isupper():
            try:
                found = getattr(importlib.import_module(module_name), attr, None)
            except ImportError:
                found = None
            if isinstance(found, type) and issubclass(found, nn.Module):
                leaves.append(found.__name__)
                continue
        leaves.append(value)
    return leaves


def _ensure_cwd_importable(name: str) -> None:
    # Like `python -m`, let `auglocal convert my_nets:build` find my_nets.py in the current folder.
    if ":" in name and name.split(":", 1)[0] not in ("tv", "torchvision", "timm", "auglocal"):
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)


def _resolve(ctx: click.Context, name: str) -> str:
    """The model name, checked: an unknown name is a usage error (exit 2) listing the closest names."""
    from auglocal_fx.hub import resolve_model_name

    _ensure_cwd_importable(name)
    try:
        resolve_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="'MODEL'") from None
    return name


def _build_model(name: str, *, num_classes: Optional[int], pretrained: bool, pretrained_file: Optional[Path]):
    from auglocal_fx.hub import PretrainedWeightsError, create_model

    try:
        return create_model(name, num_classes=num_classes, pretrained=pretrained, pretrained_file=pretrained_file)
    except PretrainedWeightsError as exc:  # say the offline way in this command's own words
        raise exc.with_file_hint("--pretrained-file PATH") from exc.__cause__


def _model_options(func):
    """Options shared by the commands that build a model."""
    for decorator in reversed(
        [
            click.option("--num-classes", type=click.IntRange(min=1), default=None,
                         help="Classifier width, passed to the model factory (default: the factory's)."),
            click.option("--input-size", callback=_input_size_option, metavar="C,H,W", default=None,
                         help="Input shape used for tracing and shapes [default: timm's pretrained_cfg, else 3,224,224]."),
            click.option("--leaf", "leaf", multiple=True, metavar="CLASS",
                         help="Keep this module class (or submodule name) whole when tracing; repeatable."),
        ]
    ):
        func = decorator(func)
    return func


# ---------------------------------------------------------------------------------------------------- convert


@main.command("convert", context_settings=_CONTEXT, short_help="Convert a model into AugLocal local layers and save it.")
@click.argument("model_name", metavar="MODEL")
@click.option("--layers", "-k", type=click.IntRange(min=1), default=None, metavar="K",
              help="Number of local layers K (required unless --cuts is given).")
@click.option("--aux-depth", type=click.IntRange(min=1), default=2, show_default=True,
              help="Depth d of the first aux net, in units of the model.")
@click.option("--pyramid", type=float, default=0.5, show_default=True, metavar="TAU",
              help="Pyramid coefficient tau: aux nets get shallower towards the output (0 = all depth d).")
@click.option("--aux-init", type=click.Choice(["copy", "fresh"]), default="copy", show_default=True,
              help="Aux units start as copies of the backbone's units or freshly initialised.")
@rule_choice_options(default="auglocal")
@_model_options
@click.option("--cuts", callback=_cuts_option, default=None, metavar="A,B,...",
              help="Explicit cut points (graph node names from `auglocal inspect`) instead of uniform ones.")
@click.option("--pretrained", is_flag=True,
              help="Start from the library's pretrained weights: from its local cache, else downloaded.")
@click.option("--pretrained-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="PATH", help="Start from local weights: .safetensors, or a .pth state_dict (weights_only).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Write the artifact here (DIR/model.safetensors and DIR/auglocal.json).")
@click.option("--overwrite", is_flag=True, help="Replace an artifact already in DIR.")
@click.option("--dry-run", is_flag=True, help="Print the table and write nothing.")
@click.pass_context
def convert_command(
    ctx: click.Context,
    model_name: str,
    layers: Optional[int],
    aux_depth: int,
    pyramid: float,
    aux_init: str,
    rule: str,
    rule_option: Dict[str, Any],
    num_classes: Optional[int],
    input_size: Optional[Tuple[int, int, int]],
    leaf: Tuple[str, ...],
    cuts: Optional[List[str]],
    pretrained: bool,
    pretrained_file: Optional[Path],
    output: Optional[Path],
    overwrite: bool,
    dry_run: bool,
) -> None:
    """Convert MODEL into K local layers with aux nets (AugLocal's, or --rule's), print the per-layer table, save
    the artifact.

    \b
    Examples:
      auglocal convert resnet50 --layers 17 -o r50-k17
      auglocal convert resnet50 --layers 17 --rule infopro --rule-option x1=5 --dry-run
      auglocal convert timm:resnet50 --layers 4 --aux-depth 3 --pyramid 0 --dry-run
      auglocal convert auglocal:resnet32 --layers 16 --input-size 3,32,32 -o r32
      auglocal convert resnet18 --layers 3 --cuts layer2,layer3 --num-classes 10 --input-size 3,64,64
      auglocal convert my_nets:build_net --layers 4 --pretrained-file net.safetensors -o net-k4
    """
    if layers is None and cuts is None:
        raise click.UsageError("pass the number of local layers with --layers K (or explicit cut points with --cuts)", ctx=ctx)
    if layers is None:
        layers = len(cuts) + 1
    if pretrained and pretrained_file is not None:
        raise click.UsageError("--pretrained downloads weights and --pretrained-file reads local ones: pass only one", ctx=ctx)
    _resolve(ctx, model_name)

    from auglocal_fx import convert
    from auglocal_fx.io import _check_target, save

    from ._render import file_size, human, make_console, summary_table, totals

    if output is not None and not dry_run:
        _check_target(output, overwrite)  # fail before the conversion, not after it
    started = time.perf_counter()
    model = _build_model(model_name, num_classes=num_classes, pretrained=pretrained, pretrained_file=pretrained_file)
    local_model = convert(
        model,
        layers=layers,
        aux_depth=aux_depth,
        pyramid=pyramid,
        aux_init=aux_init,
        input_size=input_size,
        cuts=cuts,
        leaf_modules=_leaf_modules(leaf),
        rule=rule,
        rule_options=rule_option,
    )
    plan = local_model.plan
    console = make_console()
    source_name = (plan.source or {}).get("name", model_name)
    config = plan.config
    if config.get("rule", "auglocal") == "auglocal":
        settings = (f"aux depth {config.get('aux_depth')}, pyramid {config.get('pyramid')}, "
                    f"aux init {config.get('aux_init')}")
    else:
        options = ", ".join(f"{k}={v}" for k, v in (config.get("rule_options") or {}).items())
        settings = f"rule {config['rule']}" + (f" ({options})" if options else "")
    title = (
        f"{source_name}: {plan.num_layers} local layers over {plan.num_units} units "
        f"({settings}, input {'x'.join(str(d) for d in config.get('input_size') or ())})"
    )
    console.print(summary_table(plan, local_model.summary_rows(), title=title))
    t = totals(plan)
    share = t["aux_params"] / t["backbone_params"] if t["backbone_params"] else 0.0
    console.print(
        f"backbone {human(t['backbone_params'])} params, {human(t['backbone_flops'])} FLOPs/sample; aux nets "
        f"{human(t['aux_params'])} params ({share:.0%} of the backbone), {human(t['aux_flops'])} FLOPs/sample "
        "(training only)"
    )
    if dry_run:
        console.print("dry run: nothing written")
    elif output is None:
        console.print("nothing written: add -o DIR to save the artifact")
    else:
        save(local_model, output, overwrite=overwrite)
        size = (output / "model.safetensors").stat().st_size
        console.print(
            f"wrote {output}/model.safetensors ({file_size(size)}) and {output}/auglocal.json "
            f"in {time.perf_counter() - started:.1f} s"
        )


# ---------------------------------------------------------------------------------------------------- inspect


@main.command("inspect", context_settings=_CONTEXT, short_help="Show a model's units, cut points and largest K.")
@click.argument("model_name", metavar="MODEL")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON instead of tables.")
@click.pass_context
def inspect_command(
    ctx: click.Context,
    model_name: str,
    num_classes: Optional[int],
    input_size: Optional[Tuple[int, int, int]],
    leaf: Tuple[str, ...],
    as_json: bool,
) -> None:
    """Show MODEL's units, valid cut points, head, the largest K, FLOPs and parameters per unit (no conversion).

    \b
    Examples:
      auglocal inspect resnet50
      auglocal inspect timm:vit_small_patch16_224 --input-size 3,224,224
      auglocal inspect auglocal:resnet32 --input-size 3,32,32 --json
    """
    _resolve(ctx, model_name)
    from auglocal_fx import inspect_model

    from ._render import human, make_console, units_table

    model = _build_model(model_name, num_classes=num_classes, pretrained=False, pretrained_file=None)
    inspection = inspect_model(model, input_size=input_size, leaf_modules=_leaf_modules(leaf))
    if as_json:
        click.echo(json.dumps(inspection.to_dict(), indent=2))
        return
    console = make_console()
    units = list(inspection.units)
    head = inspection.head or {}
    source_name = getattr(model, "_auglocal_source", {}).get("name", model_name)
    params = sum(u.get("params", 0) for u in units) + head.get("params", 0)
    flops = sum(u.get("flops", 0) for u in units) + head.get("flops", 0)
    traced_at = "x".join(str(d) for d in getattr(inspection, "input_size", ()) or ())
    console.print(
        f"{source_name} ({type(model).__name__}) at input {traced_at}: {len(units)} units, {human(params)} params, "
        f"{human(flops)} FLOPs/sample"
    )
    console.print(units_table(units, head))
    cuts = list(inspection.valid_cuts)
    console.print(f"valid cut points ({len(cuts)}): " + (", ".join(cuts) or "none"))
    console.print(
        f"largest K: {inspection.max_layers} (a cut after every valid point); one unit per local layer, as in the "
        f"AugLocal paper: K = {len(units)}"
    )
    leaves = list(getattr(inspection, "leaf_modules_added", []) or [])
    if leaves:
        console.print("made leaves so that tracing succeeds: " + ", ".join(leaves))
    extra = "".join(
        f" {flag} {value}" for flag, value in (("--num-classes", num_classes), ("--input-size", input_size and ",".join(map(str, input_size))))
        if value
    ) + "".join(f" --leaf {name}" for name in leaf)
    console.print(f"next: auglocal convert {model_name} --layers {len(units)}{extra} -o DIR")


# ----------------------------------------------------------------------------------------------------- export


@main.command("export", context_settings=_CONTEXT, short_help="Write an artifact's backbone as the original model's state_dict.")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE",
              help="The .safetensors file to write.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
def export_command(directory: Path, output: Path, overwrite: bool) -> None:
    """Write the trained backbone of artifact DIR as a state_dict of the original model.

    The file loads into a freshly created original model with no missing or unexpected keys:
    model.load_state_dict(safetensors.torch.load_file(FILE)), or for timm
    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=N)).

    \b
    Examples:
      auglocal export r50-k17 -o resnet50.safetensors
    """
    from auglocal_fx.io import export_backbone, read_manifest

    from ._render import file_size, make_console

    if output.suffix != ".safetensors":
        click.echo(f"warning: {output} does not end in .safetensors; it is a safetensors file all the same", err=True)
    export_backbone(directory, output, overwrite=overwrite)
    source = read_manifest(directory)["source"]
    make_console().print(
        f"wrote {output} ({file_size(output.stat().st_size)}), the backbone of {source['name']}; load it with "
        f"model.load_state_dict(safetensors.torch.load_file({str(output)!r}))"
    )


# ------------------------------------------------------------------------------------------ optional commands
# Sibling modules written by others; each is optional, but a bug inside one (an ImportError of something it
# needs) must surface, so only "this very module is absent" is tolerated.


def _absent(exc: ModuleNotFoundError, module: str) -> bool:
    return exc.name == f"{__package__}.{module}"


try:
    from .train import train_command
except ModuleNotFoundError as _exc:
    if not _absent(_exc, "train"):
        raise
else:
    main.add_command(train_command)

try:
    from .zoo import zoo_command
except ModuleNotFoundError as _exc:
    if not _absent(_exc, "zoo"):
        raise
else:
    main.add_command(zoo_command)

try:
    from .bench import bench_command, plan_command
except ModuleNotFoundError as _exc:
    if not _absent(_exc, "bench"):
        raise
else:
    main.add_command(bench_command)
    main.add_command(plan_command)


if __name__ == "__main__":  # pragma: no cover
    main()
