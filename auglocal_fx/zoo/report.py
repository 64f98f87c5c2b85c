"""The zoo's report: pass rates, the JSON file, and docs/zoo.md with every failure explained.

``KNOWN_LIMITATIONS`` holds the explanation printed under each failure that remains after fixing the converter;
a failure without an entry is a converter bug until shown otherwise.

Example::

    from auglocal_fx.zoo import read_json, write_markdown
    write_markdown(read_json("benchmarks/zoo_report.json"), "docs/zoo.md")
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from .._fsync import atomic_write_text
from .catalog import SOURCES
from .check import ZooResult

__all__ = [
    "KNOWN_LIMITATIONS",
    "FEW_UNITS_NOTES",
    "summarize",
    "write_json",
    "read_json",
    "write_markdown",
    "render_markdown",
]

REPORT_FORMAT = "auglocal-fx-zoo"
REPORT_VERSION = 1

# Failures that remain after fixing the converter, with why and what to do about them. Keys are model names or
# timm family names ("timm:<family>"); render_markdown() prints the entry under each failing model.
KNOWN_LIMITATIONS: Dict[str, str] = {
    "torchvision:regnet_y_128gf": (
        "**Memory, not a converter bug.** With one local layer per unit (28 units) the aux nets copy the later, "
        "widest units of this 645M-parameter model: the LocalModel holds about 5.0G parameters (7.7x the model), "
        "about 21 GiB in float32 before a single activation, over the harness's per-model budget on this 23 GiB "
        "machine. `layers=4` passes every step, save/load included. Workaround: fewer local layers (`layers=4..8`), "
        "`aux_depth=1`, or a machine with 32+ GiB."
    ),
    "timm:crossvit": (
        "**Limitation: two token streams.** CrossViT embeds the image twice (small and large patches) and runs both "
        "streams side by side through every block until the two class tokens meet in the head, so no point of the "
        "graph has exactly one tensor crossing it. auglocal-fx cuts where one tensor crosses; a model that keeps "
        "parallel streams cannot be split without changing it (concatenating the streams into one tensor between "
        "blocks would make it cuttable). No workaround with leaf modules or explicit cuts."
    ),
    "timm:tnt": (
        "**Limitation: two token streams.** Transformer-in-Transformer blocks take and return two tensors (the inner "
        "pixel embeddings and the outer patch embeddings), so between blocks two tensors are always live: the only "
        "valid cuts are in the stem and after the last block, one unit in all. No workaround without changing the "
        "model."
    ),
    "timm:efficientvim": (
        "**Limitation: multi-stage head.** EfficientViM's classifier reads the hidden state of every stage (one head "
        "per stage, weighted and summed), so from the end of the first stage on, several tensors stay live until "
        "the head and the graph can only be cut inside the stem and stage 0. No workaround without changing the "
        "model (a single-stage head, `heads` on the last stage only, makes it cuttable)."
    ),
    "timm:gemma4_vit": (
        "**Limitation of torch.fx: control flow on tensor metadata.** `Gemma4VitEncoder.forward` accepts raw "
        "images, pre-patchified NaFlex tensors and dicts, and branches on `x.ndim` and on padding masks "
        "(`if padding_positions.any()`), which symbolic tracing cannot follow; auglocal-fx makes the innermost "
        "failing module a leaf, here the whole encoder, leaving one unit. Workaround, verified on "
        "`gemma4_vit_167m`: [docs/examples/gemma4_vit.py](examples/gemma4_vit.py) wraps the model in a module that "
        "runs the same submodules for dense images only; it converts with 18 units, its output equals the "
        "model's within 1e-6, and a local_step gives every parameter a gradient "
        "(`pytest -m slow tests/test_zoo.py -k gemma4`)."
    ),
}

# Models that pass with few units (little to train locally), and why: rendered under "Few units" in docs/zoo.md.
FEW_UNITS_NOTES: Dict[str, str] = {
    "timm:nasnet": "NASNet cells read the outputs of the two previous cells, so two tensors are live between cells: "
                   "the only valid cuts are in the stem and before the head.",
    "timm:pnasnet": "PNASNet cells read the outputs of the two previous cells, so two tensors are live between cells: "
                    "the only valid cuts are in the stem and before the head.",
}
_FEW_UNITS = 3


# ------------------------------------------------------------------------------------------------------- JSON


def summarize(results: Sequence[ZooResult]) -> Dict[str, Dict[str, Any]]:
    """Pass counts and rates per source (and over all models)."""
    summary: Dict[str, Dict[str, Any]] = {}
    for source in SOURCES + ("all",):
        rows = [r for r in results if source == "all" or r.source == source]
        if not rows:
            continue
        passed = sum(r.passed for r in rows)
        summary[source] = {
            "total": len(rows),
            "passed": passed,
            "failed": sum(r.status == "fail" for r in rows),
            "pass_rate": round(passed / len(rows), 4),
            "seconds": round(sum(r.seconds for r in rows), 1),
        }
    return summary


def write_json(report: Mapping[str, Any], path: Path) -> None:
    """Write the report atomically (a crash mid-write keeps the previous file)."""
    atomic_write_text(Path(path), json.dumps(report, indent=1, allow_nan=False, default=str) + "\n")


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _make_report(results: Sequence[ZooResult], meta: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        **meta,
        "summary": summarize(results),
        "results": [_clean(r.to_dict()) for r in results],
    }


def _clean(obj: Any) -> Any:
    """Make floats JSON-safe (inf/nan become strings)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------- markdown


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{s:.1f} s"


def _fmt_count(n: Optional[int]) -> str:
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _limitation(result: Mapping[str, Any]) -> Optional[str]:
    for key in (result.get("name"), f"{result.get('source')}:{result.get('name')}", f"timm:{result.get('family')}"
                if result.get("source") == "timm" else None):
        if key and key in KNOWN_LIMITATIONS:
            return KNOWN_LIMITATIONS[key]
    return None


def _equiv_figure(result: Mapping[str, Any]) -> str:
    diffs = [c.get("max_abs_diff") for c in result.get("conversions") or [] if "max_abs_diff" in c]
    diffs = [d for d in diffs if isinstance(d, (int, float))]
    if not diffs:
        return ""
    worst = max(diffs)
    return "exact" if worst == 0 else f"{worst:.1e}"


def render_markdown(report: Mapping[str, Any], *, preamble: Optional[str] = None) -> str:
    """docs/zoo.md: pass rates per source at the top, then failures explained, then every model."""
    summary = report.get("summary", {})
    results = report.get("results", [])
    lines = ["# Model zoo: every torchvision classifier and every timm family", ""]
    lines += ["| source | models | passed | pass rate | failed | time |", "|---|---:|---:|---:|---:|---:|"]
    names = {"torchvision": "torchvision classification models", "timm": "timm model families", "all": "all"}
    for source in SOURCES + ("all",):
        s = summary.get(source)
        if s:
            lines.append(
                f"| {names[source]} | {s['total']} | {s['passed']} | **{100 * s['pass_rate']:.1f}%** | {s['failed']} "
                f"| {_fmt_seconds(s['seconds'])} |"
            )
    versions = report.get("versions", {})
    machine = report.get("machine", {})
    lines += [
        "",
        f"Generated by `{report.get('command') or 'auglocal zoo'}`"
        + ("" if report.get("complete") else " (**incomplete run**)"),
        f"in {_fmt_seconds(report.get('wall_seconds') or 0)} wall time, finished {report.get('finished') or '-'}, "
        f"on {machine.get('cpus', '?')} CPU cores ({machine.get('cpu', 'unknown CPU')}, "
        f"{machine.get('memory_gib', '?')} GiB), CPU only; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "",
    ]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += _HOW_TO_READ
    failures = [r for r in results if r.get("status") != "pass"]
    lines += ["", "## Failures", ""]
    if not failures:
        lines.append("None: every model passed every step.")
    for r in failures:
        lines.append(f"### {r['source']}: `{r['name']}`" + (f" (family `{r['family']}`)" if r.get("family") else ""))
        lines.append("")
        lines.append(f"- **step `{r.get('failed_step')}`**: {r.get('reason')}")
        note = _limitation(r)
        lines.append(f"- {note}" if note else "- Not yet explained: a converter bug until shown otherwise.")
        lines.append("")
    few = [r for r in results if r.get("status") == "pass" and (r.get("num_units") or 0) <= _FEW_UNITS]
    if few:
        lines += ["", "## Passing with few units", "",
                  f"These pass every step but have {_FEW_UNITS} units or fewer before the head, so there is little to "
                  "train locally:", ""]
        for r in few:
            key = f"{r['source']}:{r.get('family') if r['source'] == 'timm' else r['name']}"
            note = FEW_UNITS_NOTES.get(key, "")
            lines.append(f"- {r['source']} `{r['name']}`: {r.get('num_units')} units. {note}".rstrip())
    for source in SOURCES:
        rows = [r for r in results if r.get("source") == source]
        if not rows:
            continue
        lines += ["", f"## {names[source].capitalize()}", ""]
        first = "family / model" if source == "timm" else "model"
        lines += [
            f"| {first} | result | params | input | units | cuts | max K | K tested | max abs diff | time | notes |",
            "|---|---|---:|---|---:|---:|---:|---|---:|---:|---|",
        ]
        for r in rows:
            label = f"{r.get('family')} / `{r['name']}`" if source == "timm" else f"`{r['name']}`"
            result = "pass" if r.get("status") == "pass" else f"**fail** ({r.get('failed_step')})"
            size = "x".join(str(v) for v in r.get("input_size") or []) or "-"
            if r.get("create_kwargs"):
                size += " " + ", ".join(f"{k}={v}" for k, v in r["create_kwargs"].items())
            ks = ", ".join(str(c.get("layers")) + ("*" if c.get("save_load") else "") for c in r.get("conversions") or [])
            notes = []
            if r.get("auto_leaves"):
                notes.append(f"{len(r['auto_leaves'])} auto leaves")
            if r.get("peak_memory_gib"):
                notes.append(f"peak {r['peak_memory_gib']:.1f} GiB")
            lines.append(
                f"| {label} | {result} | {_fmt_count(r.get('params'))} | {_cell(size)} | {r.get('num_units') or ''} "
                f"| {r.get('num_cuts') if r.get('num_cuts') is not None else ''} | {r.get('max_layers') or ''} | {ks} "
                f"| {_equiv_figure(r)} | {r.get('seconds', 0):.1f} s | {_cell('; '.join(notes))} |"
            )
    return "\n".join(lines) + "\n"

_HOW_TO_READ = [
    "## What is checked",
    "",
    "Each model is built with random weights (`pretrained=False`, nothing is downloaded) and checked with a batch",
    "of 2 random images at the first input it accepts among 64, 56, 96, 112 and 128 pixels (timm's `img_size=` for",
    "fixed-size models, torchvision's `image_size=` for ViTs), else its native size. Feature extractors that timm",
    "builds without a classifier (`num_classes=0` by default: DINOv3, the encoders of multimodal models) get",
    "`num_classes=1000`. Steps:",
    "",
    "1. `trace`: `inspect_model` traces it and finds its units, valid cut points and the largest K; at least two",
    "   units are required (one unit means nothing is trained locally);",
    "2. `convert`: `convert(model, layers=<units>)` (one local layer per unit), and again with `layers=4`;",
    "3. `equivalence`: in eval mode `LocalModel.forward` equals the original output (`torch.equal`, or a max abs",
    "   difference within `1e-5 * max(1, max|reference|)`; the worst figure is in the tables);",
    "4. `local_step`: one `lm.local_step(x, y)` in training mode gives every parameter of `lm.layers` and `lm.aux`",
    "   a gradient;",
    "5. `save_load`: `auglocal_fx.io.save` then `load` give bit-identical logits from every layer and aux net, and",
    "   the same state_dict keys.",
    "",
    "Steps 3 and 4 run for both conversions; step 5 for the one-layer-per-unit conversion (the most cuts to",
    "re-apply), or for the 4-layer one when the former holds more than 400M parameters (a round trip holds the",
    "file's tensors and a rebuilt model at once). The round-tripped K is starred in the tables. A conversion whose",
    "weights alone, estimated from the units before converting, would not fit the per-model memory budget is not",
    "attempted: its `convert` step fails with the estimate. torchvision: every classification model of",
    "`torchvision.models`. timm: each module of `timm.models` that registers models (a *family*), represented by",
    "its smallest architecture by parameter count. Each model runs in its own forked process with a time and a",
    "memory limit, one torch thread, so one crash fails one model.",
    "",
    "Run it yourself:",
    "",
    "```",
    "auglocal zoo --json benchmarks/zoo_report.json --markdown docs/zoo.md --max-memory 14   # everything",
    "auglocal zoo --source timm --filter 'vit_*' --filter convnext       # globs on model and family names",
    "auglocal zoo --source torchvision --filter resnet50 --no-isolate    # one model, in this process",
    "pytest -m slow tests/test_zoo.py                                    # the full zoo as a test",
    "```",
    "",
    "The default `pytest` run checks a fast subset on every CI run: timm's tiny `test_*` models and ten small",
    "torchvision models (`auglocal_fx.zoo.fast_subset()`).",
]


def write_markdown(report: Mapping[str, Any], path: Path, *, preamble: Optional[str] = None) -> None:
    atomic_write_text(Path(path), render_markdown(report, preamble=preamble))
