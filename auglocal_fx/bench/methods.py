"""The benchmarked methods: end-to-end BP, BP with activation checkpointing, and every local-learning rule.

Each :class:`Method` is a step function over a LocalModel and the optimizers it steps, with what it owns (the
parameters it trains, whether aux nets are part of it) for the memory accounting. BP and checkpointing run
through the layers of the benchmark's LocalModel; AugLocal runs that LocalModel (when it was converted with the
AugLocal rule); every other rule gets its own conversion of the same model at the same cut points.

Example::

    config = BenchConfig(batch=64, methods=("bp", "checkpoint", "auglocal", "dgl"))
    methods = build_methods(lm, config)
    methods[1].step(x, y, tracker=None)     # one checkpointed BP step, optimizer included
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..checkpointing import CheckpointedBP
from ..local_model import LocalModel
from ..optim import PerLayerOptimizer
from .memory import StepMemoryTracker

__all__ = ["BenchConfig", "Method", "make_optimizer", "build_methods", "BASELINES", "IMAGENET_MEAN", "IMAGENET_STD"]

BASELINES = ("bp", "checkpoint")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LABELS = {"bp": "BP", "checkpoint": "checkpoint", "auglocal": "AugLocal", "dgl": "DGL", "predsim": "PredSim",
           "infopro": "InfoPro", "greedy": "greedy SL"}


@dataclass
class BenchConfig:
    batch: int
    steps: int = 5  # timed steps of each method
    warmup: int = 1  # untimed steps of each method first
    device: str = "cpu"
    amp: bool = False  # bfloat16 autocast (CPU and CUDA)
    optimizer: str = "sgd"  # "sgd" (momentum), "adamw" or "sgd-nomomentum"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    layer_step: bool = True  # local rules: step and free each layer's gradients right after its backward
    channels_last: bool = False
    memory_probe: bool = True  # one extra, untimed step of each method with memory instrumentation
    flops_batch: int = 2  # FLOPs are counted on this many samples and scaled (they are linear in the batch)
    seed: int = 0
    run_bp: bool = True  # False drops "bp" from methods (kept for older callers)
    methods: Tuple[str, ...] = ("bp", "auglocal")
    checkpoint_segments: Optional[int] = None  # None: about sqrt(K), chosen to minimise memory
    cudnn_benchmark: bool = False  # CUDA: let cuDNN time its algorithms (torch.backends.cudnn.benchmark)
    compile: bool = False  # torch.compile each local layer and aux net (every method runs the compiled modules)
    mean: Tuple[float, ...] = IMAGENET_MEAN  # the input normalisation, for rules that reconstruct the input
    std: Tuple[float, ...] = IMAGENET_STD
    rule_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per rule, its options

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError("batch and steps must be >= 1 and warmup >= 0")
        if self.optimizer not in ("sgd", "adamw", "sgd-nomomentum"):
            raise ValueError(f"optimizer must be sgd, adamw or sgd-nomomentum, got {self.optimizer!r}")
        methods = tuple(dict.fromkeys(str(m).strip().lower() for m in self.methods if str(m).strip()))
        if not self.run_bp:
            methods = tuple(m for m in methods if m != "bp")
        if not methods:
            raise ValueError("methods must name at least one of bp, checkpoint or a rule (auglocal, dgl, ...)")
        self.methods = methods
        if self.checkpoint_segments is not None and self.checkpoint_segments < 1:
            raise ValueError(f"checkpoint_segments must be >= 1, got {self.checkpoint_segments}")


def make_optimizer(params: Sequence[Union[nn.Parameter, Mapping[str, Any]]], config: BenchConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over ``params`` (tensors or param groups); the fused kernel where torch has one (one
    pass, no temporaries: on the CPU here 4-10x faster than the per-tensor loop), the same for every method."""
    if params and isinstance(params[0], Mapping):
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
        params = [g for g in groups if g["params"]]
        tensors = [p for g in params for p in g["params"]]
    else:
        params = tensors = [p for p in params if p.requires_grad]
    if config.optimizer == "adamw":
        make = lambda **kw: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **kw)  # noqa: E731
    else:
        momentum = 0.0 if config.optimizer == "sgd-nomomentum" else config.momentum
        make = lambda **kw: torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay, **kw)  # noqa: E731
    if tensors and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors):
        try:
            return make(fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return make()


@dataclass
class Method:
    """One method's step over ``lm``. ``step(x, y, tracker)`` runs forward, backward and the optimizer step(s)."""

    name: str
    label: str
    lm: LocalModel
    kind: str  # "bp", "checkpoint" or "local"
    params: List[nn.Parameter]  # what the step trains (gradients tracked)
    optimizers: List[torch.optim.Optimizer]
    with_aux: bool
    run: Callable[[torch.Tensor, torch.Tensor, Optional[StepMemoryTracker]], None]
    info: Dict[str, Any] = field(default_factory=dict)

    def step(self, x: torch.Tensor, y: torch.Tensor, tracker: Optional[StepMemoryTracker] = None) -> None:
        self.run(x, y, tracker)


def autocast(config: BenchConfig, device: torch.device):
    if not config.amp:
        return contextlib.nullcontext()
    # No weight-cast cache: it keeps a bfloat16 copy of every weight used until the autocast region exits, i.e.
    # of every aux net until the end of local_step (+380 MiB for resnet50 K=17); BP uses each weight once.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)


def _bp(lm: LocalModel, config: BenchConfig, device: torch.device) -> Method:
    opt = make_optimizer(lm.backbone_parameters(), config)

    def run(x, y, tracker):
        with autocast(config, device):
            lm.bp_step(x, y)
        opt.step()

    return Method("bp", "BP", lm, "bp", lm.backbone_parameters(), [opt], False, run)


def _checkpoint(lm: LocalModel, config: BenchConfig, device: torch.device) -> Method:
    opt = make_optimizer(lm.backbone_parameters(), config)
    ckpt = CheckpointedBP(lm, segments=config.checkpoint_segments)

    def run(x, y, tracker):
        with autocast(config, device):
            ckpt.step(x, y)
        opt.step()

    method = Method("checkpoint", "checkpoint", lm, "checkpoint", lm.backbone_parameters(), [opt], False, run)
    method.info["checkpointed_bp"] = ckpt
    return method


def _local(name: str, lm: LocalModel, config: BenchConfig, device: torch.device) -> Method:
    params = list(lm.parameters())
    kwargs = {"mean": config.mean, "std": config.std} if getattr(lm.rule, "needs_input", False) else {}
    method = Method(name, _LABELS.get(name, name), lm, "local", params, [], True, lambda x, y, t: None)
    if config.layer_step:
        def release(group):
            if method.info.get("tracker") is not None:
                method.info["tracker"].grads_released(group)

        layerwise = PerLayerOptimizer(lm, lambda groups: make_optimizer(groups, config), on_release=release)
        method.optimizers = [o for o in layerwise.optimizers if o is not None]

        def run(x, y, tracker):
            method.info["tracker"] = tracker

            def after(k: int) -> None:
                layerwise.after_backward(k)
                if tracker is not None:
                    tracker.mark(k)

            try:
                with autocast(config, device):
                    lm.local_step(x, y, after_backward=after, **kwargs)
            finally:
                method.info["tracker"] = None
    else:
        opt = make_optimizer(params, config)
        method.optimizers = [opt]

        def run(x, y, tracker):
            with autocast(config, device):
                lm.local_step(x, y, after_backward=tracker.mark if tracker is not None else None, **kwargs)
            opt.step()

    method.run = run
    return method


def _convert_rule(lm: LocalModel, rule: str, options: Optional[Mapping[str, Any]] = None) -> LocalModel:
    """The same model with another rule's aux nets: a conversion of its own, with the same K (the partition into
    layers is deterministic, so the cut points are the same)."""
    from ..convert import convert

    c = lm.plan.config
    return convert(lm.source_model, layers=lm.plan.num_layers, aux_depth=c["aux_depth"], pyramid=c["pyramid"],
                   input_size=tuple(c["input_size"]), rule=rule, rule_options=options)


def build_methods(lm: LocalModel, config: BenchConfig, *, device: Optional[torch.device] = None,
                  prepare: Optional[Callable[[LocalModel], LocalModel]] = None,
                  progress: Optional[Callable[[str], None]] = None) -> List[Method]:
    """One :class:`Method` per ``config.methods`` entry, in that order. ``prepare`` moves a new LocalModel (a
    rule's own conversion) to the device and format of ``lm``."""
    from ..rules import list_rules

    device = device or next(lm.parameters()).device
    own_rule = getattr(getattr(lm, "rule", None), "name", "auglocal")
    rules = list_rules()
    unknown = [m for m in config.methods if m not in BASELINES and m not in rules]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: choose from {', '.join(BASELINES + tuple(rules))}")
    methods = []
    for name in config.methods:
        if name == "bp":
            methods.append(_bp(lm, config, device))
        elif name == "checkpoint":
            methods.append(_checkpoint(lm, config, device))
        else:
            model = lm
            if name != own_rule or config.rule_options.get(name):
                if progress:
                    progress(f"converting for rule {name}")
                model = _convert_rule(lm, name, config.rule_options.get(name))
                model = prepare(model) if prepare else model.to(device)
            methods.append(_local(name, model, config, device))
    return methods
