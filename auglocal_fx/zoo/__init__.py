"""The model zoo check: convert every torchvision classifier and every timm model family, and prove it works.

For each model, with random weights (``pretrained=False`` always: nothing is downloaded) and a small input where
the model allows one, the zoo runs five steps and records which one failed, a one-line reason and the time:

1. ``trace``: :func:`auglocal_fx.inspect_model` finds the units, the valid cut points and the largest K;
2. ``convert``: :func:`auglocal_fx.convert` with one local layer per unit, and again with ``layers=4``;
3. ``equivalence``: in eval mode, ``LocalModel.forward`` returns the original model's output (``torch.equal``, or a
   max abs difference within ``1e-5 * max(1, max|reference|)``; the figure is reported);
4. ``local_step``: one :meth:`~auglocal_fx.LocalModel.local_step` in training mode gives every parameter of
   ``lm.layers`` and ``lm.aux`` that requires grad a gradient;
5. ``save_load``: :func:`auglocal_fx.io.save` then :func:`auglocal_fx.io.load` give a model whose layer-wise logits
   (every layer and every aux net) are bit-identical.

Steps 3 and 4 run for both conversions, step 5 for the one-layer-per-unit conversion (the most cuts to
re-apply) unless its LocalModel holds more than 400M parameters, then for the 4-layer one. A ``create`` step
comes first: it builds the model and picks its input size (the first of a few small candidates, then the
model's native size, whose eval forward runs).

Models under test: every torchvision classification model (``torchvision.models.list_models(module=
torchvision.models)``), and for timm every model family (each ``timm.models.<module>`` that registers models)
represented by its smallest architecture by parameter count, counted on the meta device so nothing is allocated.
Filters (shell globs) select from model names and timm family names; a filter matching a model name that is not a
family's representative adds that model.

By default every model runs in a forked worker process, so that a crash, a hang (``timeout``) or a model that
exhausts memory fails that model only; the JSON report is rewritten after every model, so an interrupted run loses
nothing and ``resume=True`` picks up where it stopped.

Example::

    from auglocal_fx import zoo
    models = zoo.select_models("timm", ["resnet", "vit_*"])
    report = zoo.run_zoo(models, json_path="zoo.json")
    zoo.write_markdown(report, "zoo.md")

    zoo.check_model(zoo.ZooModel("torchvision", "resnet18"))   # one model, in this process -> ZooResult

The package is split by concern: :mod:`~auglocal_fx.zoo.catalog` (which models, which input sizes),
:mod:`~auglocal_fx.zoo.check` (one model through the steps), :mod:`~auglocal_fx.zoo.runner` (every model in a
forked worker) and :mod:`~auglocal_fx.zoo.report` (the JSON and the markdown, with the known limitations).
"""
from __future__ import annotations

from . import catalog, check, report, runner
from .catalog import (
    FAST_TORCHVISION,
    SOURCES,
    ZooModel,
    candidate_configs,
    count_params_meta,
    fast_subset,
    select_models,
    timm_families,
    timm_family_representatives,
    timm_param_counts,
    torchvision_models,
)
from .check import STEPS, ZooResult, check_model, one_line
from .report import (
    FEW_UNITS_NOTES,
    KNOWN_LIMITATIONS,
    read_json,
    render_markdown,
    summarize,
    write_json,
    write_markdown,
)
from .runner import run_zoo

__all__ = [
    "SOURCES",
    "STEPS",
    "ZooModel",
    "ZooResult",
    "torchvision_models",
    "timm_families",
    "timm_param_counts",
    "timm_family_representatives",
    "select_models",
    "fast_subset",
    "candidate_configs",
    "check_model",
    "run_zoo",
    "summarize",
    "write_json",
    "read_json",
    "write_markdown",
    "render_markdown",
    "KNOWN_LIMITATIONS",
]
