"""Benchmark local learning against what users would pick instead, in one process, on the same model, batch, data.

:func:`run_benchmark` runs every method of ``BenchConfig.methods`` after a warm-up, taking turns:

* ``bp``: end-to-end backprop through the LocalModel's layers (``LocalModel.bp_step``);
* ``checkpoint``: the same with activation checkpointing at the converter's cut points
  (:class:`auglocal_fx.checkpointing.CheckpointedBP`, about ``sqrt(K)`` segments chosen to minimise memory);
* every local-learning rule by name (``auglocal``, ``dgl``, ``predsim``, ``infopro``, ``greedy``, or one you
  registered): ``LocalModel.local_step`` of a conversion with that rule, cut at the same points.

It reports, for each: the median and spread of the step time, images/s, the peak memory with everything
counted, and the FLOPs per step (backbone and aux nets apart); then each method's ratios to BP, with its step
time against its compute-proportional ideal, ``BP time * (method step FLOPs) / (BP step FLOPs)``.

What "peak memory, everything counted" means here (the same for every method):

    peak = parameter state (weights and buffers, optimizer state, per group backbone / aux)
         + the input batch
         + the step's own peak: saved activations, parameter gradients, temporaries

* BP and checkpointing own the backbone only; a local rule owns the backbone and its aux nets.
* Parameter state is counted exactly from the tensors (``optimizer.state`` included).
* The step's own peak is *measured* (:mod:`~auglocal_fx.bench.memory`): ``torch.cuda.max_memory_allocated`` on
  CUDA, the process's peak RSS increase on the CPU. All methods run in the same process, so each one's baseline
  holds the others' state: measuring the increase and adding each method's own state keeps them apart.
* It is also *accounted*: :class:`StepMemoryTracker` follows every tensor autograd saves for backward and every
  parameter gradient, so the peak splits into activations, gradients and the rest.

A local rule's default step is the memory-lean one: each layer's optimizer steps in ``after_backward(k)``
(:class:`auglocal_fx.PerLayerOptimizer`) and its gradients are dropped at once, so only one layer's gradients
ever exist; ``layer_step=False`` measures one optimizer stepped after the whole ``local_step``.

The package is split by concern: :mod:`~auglocal_fx.bench.memory` (memory probes and byte sizes),
:mod:`~auglocal_fx.bench.flops` (FLOP counting), :mod:`~auglocal_fx.bench.methods` (the configuration and each
method's step), :mod:`~auglocal_fx.bench.runner` (the benchmark itself) and :mod:`~auglocal_fx.bench.report`
(table, JSON and plot).

Example::

    lm = auglocal_fx.convert(torchvision.models.resnet18(num_classes=10), layers=9, input_size=(3, 32, 32))
    result = run_benchmark(lm, BenchConfig(batch=32, steps=5, methods=("bp", "checkpoint", "auglocal")))
    print(format_report(result))          # a table; result is JSON-able (write_json), write_plot draws a PNG
"""
from __future__ import annotations

from ..optim import PerLayerOptimizer
from .flops import count_checkpoint_flops, count_step_flops
from .memory import GiB, MiB, StepMemoryTracker, format_bytes, parse_bytes
from .methods import BenchConfig, Method, build_methods, make_optimizer
from .report import format_report, winners, write_json, write_plot
from .runner import benchmark_model, run_benchmark, time_convert

# The per-layer optimizer lives in the core now (auglocal_fx.optim); the old name stays importable.
LayerwiseOptimizer = PerLayerOptimizer

__all__ = [
    "BenchConfig",
    "Method",
    "build_methods",
    "run_benchmark",
    "benchmark_model",
    "count_step_flops",
    "count_checkpoint_flops",
    "StepMemoryTracker",
    "make_optimizer",
    "LayerwiseOptimizer",
    "format_report",
    "winners",
    "write_json",
    "write_plot",
    "parse_bytes",
    "format_bytes",
    "time_convert",
    "GiB",
    "MiB",
]
