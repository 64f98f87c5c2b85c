"""``auglocal bench`` and ``auglocal plan``: thin click layers over :mod:`auglocal_fx.bench` and
:mod:`auglocal_fx.planner` (the library does the work and returns JSON-able reports)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import click

from ._options import option_callback, parse_input_size, parse_int_list, rule_choice_options

__all__ = ["bench_command", "plan_command"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _parse_bytes(value: str) -> int:
    from auglocal_fx.bench import parse_bytes  # imported when used: keeps `auglocal --help` fast

    return parse_bytes(value)


_input_size = option_callback(parse_input_size)
_memory = option_callback(_parse_bytes)
_int_list = option_callback(parse_int_list)


def _resolve(ctx: click.Context, name: str) -> str:
    from .main import _resolve as resolve

    return resolve(ctx, name)


def _check_device(ctx: click.Context, device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError("--device cuda: torch sees no CUDA device on this machine", ctx=ctx)


@click.command("bench", context_settings=_CONTEXT)
@click.argument("model_name", metavar="MODEL")
@click.option("--layers", "-k", type=click.IntRange(min=2), required=True, metavar="K", help="Number of local layers K.")
@click.option("--aux-depth", type=click.IntRange(min=1), default=2, show_default=True, help="Aux net depth d.")
@click.option("--pyramid", type=click.FloatRange(0, 1), default=0.5, show_default=True, metavar="TAU",
              help="Pyramid coefficient tau.")
@click.option("--batch", "-b", type=click.IntRange(min=1), required=True, help="Batch size.")
@click.option("--input-size", callback=_input_size, metavar="C,H,W", default=None,
              help="Input shape [default: timm's pretrained_cfg, else 3,224,224].")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier width (default: the factory's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--amp", is_flag=True, help="bfloat16 autocast for both methods.")
@click.option("--channels-last", is_flag=True, help="channels_last memory format for both methods.")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Timed steps of each method.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed steps of each method first.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw", "sgd-nomomentum"]), default="sgd", show_default=True,
              help="sgd is SGD with momentum 0.9 and weight decay 1e-4 (fused kernel), the same for both methods.")
@click.option("--optimizer-step", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
              help="AugLocal: step each layer's optimizer right after its backward and drop its gradients (layer), "
                   "or one optimizer step after the whole local step (global).")
@click.option("--no-memory-probe", is_flag=True, help="Skip the instrumented memory step of each method.")
@click.option("--methods", default=None, metavar="M,M,...",
              help="Methods to compare: bp, checkpoint (BP with activation checkpointing at the cut points) and "
                   "local-learning rules by name (auglocal, dgl, predsim, infopro, greedy) [default: bp,RULE].")
@rule_choice_options(default="auglocal")
@click.option("--checkpoint-segments", type=click.IntRange(min=1), default=None, metavar="N",
              help="checkpoint: number of segments [default: about sqrt(K), boundaries chosen to minimise memory].")
@click.option("--cudnn-benchmark", is_flag=True, help="CUDA: torch.backends.cudnn.benchmark for every method.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile every local layer and aux net (all methods).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write a PNG chart (step time, peak memory split).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--nproc-per-node", "nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Data-parallel scaling instead: the auglocal step on N ranks here (BATCH is the global batch); "
                   "prints images/s and the all-reduce time waited vs. overlapped as JSON (docs/distributed.md).")
@click.pass_context
def bench_command(ctx: click.Context, model_name: str, layers: int, aux_depth: int, pyramid: float, batch: int,
                  input_size: Optional[Tuple[int, int, int]], num_classes: Optional[int], device: str, amp: bool,
                  channels_last: bool, steps: int, warmup: int, optimizer: str, optimizer_step: str,
                  no_memory_probe: bool, methods: Optional[str], rule: str, rule_option: Dict[str, Any],
                  checkpoint_segments: Optional[int], cudnn_benchmark: bool,
                  compile_: bool, json_path: Optional[Path], plot_path: Optional[Path], quiet: bool,
                  nproc: Optional[int] = None) -> None:
    """Alternate end-to-end BP, checkpointed BP and local-learning steps on MODEL; compare time, memory and FLOPs.

    Every method runs in one process on the same layers, batch and data. Peak memory counts everything: weights, optimizer
    state and gradients (backbone and aux nets apart), activations and temporaries; measured with
    torch.cuda.max_memory_allocated on CUDA and as the process's peak RSS increase on the CPU.

    \b
    Examples:
      auglocal bench resnet50 --layers 17 --batch 64 --steps 3 --json r50.json --plot r50.png
      auglocal bench auglocal:resnet32 --layers 16 --batch 128 --input-size 3,32,32 --num-classes 10
      auglocal bench resnet50 --layers 17 --batch 256 --device cuda --amp
      auglocal bench resnet50 --layers 17 --batch 64 --methods bp,checkpoint,auglocal,dgl,predsim,infopro,greedy
      auglocal bench resnet50 --layers 17 --batch 64 --rule infopro --rule-option decoder=progressive
    """
    _resolve(ctx, model_name)
    _check_device(ctx, device)
    if nproc is not None:  # data-parallel scaling: auglocal_fx.distributed._bench on N ranks
        from auglocal_fx.distributed._bench import main as dp_bench

        size = input_size[1] if input_size else 224
        dp_bench(["--model", model_name, "--batch", str(batch), "--img-size", str(size), "--layers", str(layers),
                  "--steps", str(steps), "--warmup", str(warmup), "--device", device, "--nproc-per-node", str(nproc)])
        return
    from auglocal_fx.bench import BenchConfig, benchmark_model, format_report, write_json, write_plot

    from auglocal_fx.rules import get_rule

    try:
        get_rule(rule).resolve_options(rule_option)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param_hint="'--rule' / '--rule-option'") from None
    methods = methods or f"bp,{rule}"
    config = BenchConfig(batch=batch, steps=steps, warmup=warmup, device=device, amp=amp, optimizer=optimizer,
                         layer_step=optimizer_step == "layer", channels_last=channels_last,
                         memory_probe=not no_memory_probe, methods=tuple(methods.split(",")),
                         rule_options={rule: rule_option} if rule_option else {},
                         checkpoint_segments=checkpoint_segments, cudnn_benchmark=cudnn_benchmark, compile=compile_)
    progress = None if quiet else (lambda msg: click.echo(msg, err=True))
    report = benchmark_model(model_name, layers=layers, config=config, aux_depth=aux_depth, pyramid=pyramid,
                             input_size=input_size, num_classes=num_classes, progress=progress)
    click.echo(format_report(report))
    if json_path is not None:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        write_plot(report, plot_path)
        click.echo(f"wrote {plot_path}")


@click.command("plan", context_settings=_CONTEXT)
@click.argument("model_name", metavar="MODEL")
@click.option("--batch", "-b", type=click.IntRange(min=1), required=True, help="Batch size.")
@click.option("--memory-budget", callback=_memory, required=True, metavar="SIZE",
              help="Memory to fit in, e.g. 8GiB, 8GB, 512MiB.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the training will run on; footprints are probed there when it is available "
                   "(CUDA-only extras such as cuDNN workspaces are not modeled).")
@click.option("--layers", "layers", callback=_int_list, default=None, metavar="K,K,...",
              help="Candidate K values [default: 2 .. one unit per layer].")
@click.option("--aux-depths", callback=_int_list, default="1,2,3,4", show_default=True, metavar="D,D,...",
              help="Candidate aux depths d.")
@click.option("--pyramid", type=click.FloatRange(0, 1), default=0.5, show_default=True, metavar="TAU")
@click.option("--input-size", callback=_input_size, metavar="C,H,W", default=None,
              help="Input shape [default: timm's pretrained_cfg, else 3,224,224].")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier width (default: the factory's).")
@click.option("--amp", is_flag=True, help="bfloat16 autocast.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw", "sgd-nomomentum"]), default="sgd", show_default=True)
@click.option("--optimizer-step", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--checkpoint-segments", type=click.IntRange(min=1), default=None, metavar="N",
              help="Segments of BP with activation checkpointing, whose peak is predicted too "
                   "[default: about sqrt(units), chosen to minimise memory].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Write every prediction as JSON.")
@click.pass_context
def plan_command(ctx: click.Context, model_name: str, batch: int, memory_budget: int, device: str,
                 layers: Optional[Sequence[int]], aux_depths: Sequence[int], pyramid: float,
                 input_size: Optional[Tuple[int, int, int]], num_classes: Optional[int], amp: bool, optimizer: str,
                 optimizer_step: str, checkpoint_segments: Optional[int], json_path: Optional[Path]) -> None:
    """Predict the peak training memory of BP, of BP with activation checkpointing and of AugLocal for each K and
    aux depth, and recommend one.

    The recommendation is the configuration with the fewest, then shallowest, aux nets whose predicted peak fits
    the budget. Predictions come from the plan (parameters of the backbone and of every aux net) and activation
    footprints measured once on a batch of 2 and scaled; no training step is run.

    \b
    Examples:
      auglocal plan resnet50 --batch 64 --memory-budget 8GiB
      auglocal plan resnet50 --batch 256 --memory-budget 16GiB --device cuda --amp
      auglocal plan auglocal:resnet110 --batch 1024 --memory-budget 4GiB --input-size 3,32,32 --num-classes 10
    """
    _resolve(ctx, model_name)
    from auglocal_fx.hub import create_model
    from auglocal_fx.planner import format_plan_report, plan_memory

    model = create_model(model_name, num_classes=num_classes)
    report = plan_memory(model, batch=batch, budget=memory_budget, layers=layers, aux_depths=aux_depths,
                         pyramid=pyramid, input_size=input_size, device=device, amp=amp, optimizer=optimizer,
                         layer_step=optimizer_step == "layer", checkpoint_segments=checkpoint_segments)
    report["model"] = model_name
    click.echo(format_plan_report(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
