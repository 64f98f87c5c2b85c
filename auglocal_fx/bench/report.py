"""The benchmark's outputs: the JSON file, a plain-text table for people, and a PNG chart.

Example::

    report = run_benchmark(lm, BenchConfig(batch=32, methods=("bp", "checkpoint", "auglocal")))
    print(format_report(report))     # figures per method, then ratios to BP and where each method wins
    write_json(report, "r.json")
    write_plot(report, "r.png")      # step time against the FLOP-proportional ideal; peak memory split
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .memory import GiB, format_bytes

__all__ = ["write_json", "format_report", "write_plot", "winners"]

_COLORS = {"bp": "#7f7f7f", "checkpoint": "#9467bd", "auglocal": "#1f77b4", "dgl": "#2ca02c", "predsim": "#ff7f0e",
           "infopro": "#d62728", "greedy": "#8c564b"}


def write_json(report: Dict[str, Any], path: os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _methods(report: Dict[str, Any]) -> List[str]:
    return list(report.get("methods") or [m for m in ("bp", "auglocal") if m in report])


def _label(report: Dict[str, Any], name: str) -> str:
    return (report.get("labels") or {}).get(name) or {"bp": "BP", "auglocal": "AugLocal"}.get(name, name)


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def winners(report: Dict[str, Any]) -> Dict[str, str]:
    """The method with the lowest peak memory, step time, and peak memory x step time (BP counts as 1 x 1)."""
    names = _methods(report)
    vs = report.get("vs_bp") or {}

    def figure(name: str, key: str) -> Optional[float]:
        return 1.0 if name == "bp" else vs.get(name, {}).get(key)

    out = {}
    for what, key in (("memory", "peak_memory"), ("time", "step_time"), ("memory x time", "memory_x_time")):
        scored = [(figure(n, key), n) for n in names if figure(n, key) is not None]
        if len(scored) > 1:
            out[what] = min(scored)[1]
    return out


def _table(rows: List[tuple]) -> List[str]:
    widths = [max(len(str(rw[i])) for rw in rows) for i in range(len(rows[0]))]
    lines = []
    for i, rw in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(rw, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def format_report(report: Dict[str, Any]) -> str:
    """A plain-text table for people (the CLI prints it; the JSON holds everything)."""
    cfg = report["config"]
    names = _methods(report)
    lines = [
        f"{report.get('model') or 'model'}: K={cfg['layers']} aux depth {cfg['aux_depth']} pyramid {cfg['pyramid']}, "
        f"batch {cfg['batch']} x {'x'.join(str(v) for v in cfg['input_size'])}, {cfg['device']}"
        f"{' bf16 autocast' if cfg['amp'] else ''}{' channels_last' if cfg['channels_last'] else ''}"
        f"{' compiled' if cfg.get('compile') else ''}, "
        f"{cfg['optimizer']} ({'per-layer step' if cfg['layer_step'] else 'one optimizer step'} for local rules), "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps each",
        f"params: backbone {report['params']['backbone'] / 1e6:.2f}M, AugLocal aux nets {report['params']['aux'] / 1e6:.2f}M "
        f"({report['params']['aux'] / max(1, report['params']['backbone']):.2f}x the backbone)",
    ]
    rows: List[tuple] = [("", *[_label(report, n) for n in names])]

    def row(label: str, fn: Callable[[Dict[str, Any]], Any], fmt: Callable[[Any], str] = str) -> None:
        vals = []
        for n in names:
            try:
                v = fn(report[n])
            except (KeyError, TypeError):
                v = None
            vals.append("-" if v is None else fmt(v))
        rows.append((label, *vals))

    sec = lambda v: f"{v:.3f} s"  # noqa: E731
    giga = lambda v: f"{v / 1e9:.1f} G"  # noqa: E731
    state = lambda m, k: m["memory"]["state"][k]  # noqa: E731
    row("step time (median)", lambda m: m["time"]["median_s"], sec)
    row("  spread (max-min)/median", lambda m: m["time"]["spread"], lambda v: f"{v:.1%}")
    row("process CPU time (median)", lambda m: m["time"]["cpu"]["median_s"], sec)
    row("images/s", lambda m: m["time"]["images_per_s"], lambda v: f"{v:.1f}")
    row("FLOPs/step backbone", lambda m: m["flops_per_step"]["backbone"], giga)
    row("FLOPs/step aux nets", lambda m: m["flops_per_step"]["aux"], giga)
    row("FLOPs/step total", lambda m: m["flops_per_step"]["backbone"] + m["flops_per_step"]["aux"], giga)
    row("peak memory (everything)", lambda m: m["memory"]["peak"], format_bytes)
    row("  weights+buffers", lambda m: state(m, "backbone_weights") + state(m, "aux_weights"), format_bytes)
    row("    of which aux nets", lambda m: state(m, "aux_weights"), format_bytes)
    row("  optimizer state", lambda m: state(m, "backbone_optimizer") + state(m, "aux_optimizer"), format_bytes)
    row("    of which aux nets", lambda m: state(m, "aux_optimizer"), format_bytes)
    row("  input batch", lambda m: m["memory"]["batch_bytes"], format_bytes)
    row("  step: activations at peak", lambda m: m["memory"]["activations_at_step_peak"], format_bytes)
    row("  step: gradients at peak", lambda m: m["memory"]["grads_at_step_peak"], format_bytes)
    row("  step: other (temporaries)", lambda m: m["memory"]["other_at_peak"], format_bytes)
    row("activation peak (saved)", lambda m: m["memory"]["activations_peak"], format_bytes)
    row("gradient peak", lambda m: m["memory"]["grads_peak"], format_bytes)
    row("accounted peak (no temporaries)", lambda m: m["memory"]["accounted_peak"], format_bytes)
    lines += _table(rows)

    vs = report.get("vs_bp") or {}
    others = [n for n in names if n in vs]
    if others:
        lines.append("")
        ratio_rows: List[tuple] = [("ratio to BP", *[f"{_label(report, n)}/BP" for n in others])]
        for label, key in (("step time", "step_time"), ("images/s", "images_per_s"), ("FLOPs/step", "flops_per_step"),
                           ("step time vs FLOP-proportional ideal", "step_time_vs_ideal"),
                           ("peak memory", "peak_memory"), ("accounted peak", "accounted_peak"),
                           ("activation peak", "activations"), ("peak memory x step time", "memory_x_time")):
            ratio_rows.append((label, *[_x(vs[n].get(key)) for n in others]))
        lines += _table(ratio_rows)
        lines.append("step time vs FLOP-proportional ideal: the method's time over BP time x its step-FLOP ratio "
                     "(the compute-proportional ideal)")
        win = winners(report)
        if win:
            lines.append("lowest: " + "; ".join(f"{what}: {_label(report, n)}" for what, n in win.items()))
    f = report["flops"]
    lines.append(f"AugLocal aux FLOP overhead: {f['aux_overhead_forward']:.2f}x the backbone's forward FLOPs "
                 f"({f['aux_overhead_step']:.2f}x per training step)")
    for n in names:
        mem = report[n]["memory"]
        if "local_limit" in mem:
            lines.append(
                f"{_label(report, n)} activation peak {format_bytes(mem['activations_peak'])} vs the local-learning "
                f"limit (largest layer + aux net footprint) {format_bytes(mem['local_limit'])}; carried across layers: "
                f"{format_bytes(mem['carried_across_layers'])}")
    if "checkpoint" in report and "checkpoint" in report["checkpoint"]:
        ck = report["checkpoint"]["checkpoint"]
        lines.append(f"checkpoint: {ck['segments']} segments over the {cfg['layers']} local layers "
                     f"{[tuple(r) for r in ck['ranges']]}; predicted saved-activation peak "
                     f"{format_bytes(ck['predicted_saved_peak'])} (recomputed activations are not seen by the "
                     "saved-tensor hooks: they show under 'other')")
    measured = next((report[n]["memory"].get("measured_by") for n in names if report[n]["memory"].get("measured_by")), None)
    if measured:
        lines.append(f"step peaks measured by {measured} (plus each method's own state and the batch)")
    if "convert_s" in report:
        lines.append(f"convert: {report['convert_s']:.2f} s")
    return "\n".join(lines)


def write_plot(report: Dict[str, Any], path: os.PathLike) -> None:
    """A PNG: step time per method (with its FLOP-proportional ideal) and peak memory split into its parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _methods(report)
    labels = [_label(report, n) for n in names]
    vs = report.get("vs_bp") or {}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(names) + 4), 4.6))
    med = [report[n]["time"]["median_s"] for n in names]
    lo = [med[i] - report[n]["time"]["min_s"] for i, n in enumerate(names)]
    hi = [report[n]["time"]["max_s"] - med[i] for i, n in enumerate(names)]
    ax_t.bar(labels, med, yerr=[lo, hi], capsize=6, color=[_COLORS.get(n, "#17becf") for n in names])
    ideal = [(i, vs[n]["ideal_step_time_s"]) for i, n in enumerate(names) if n in vs]
    for j, (i, value) in enumerate(ideal):
        ax_t.hlines(value, i - 0.4, i + 0.4, colors="#d62728", linestyles="--",
                    label="FLOP-proportional ideal (BP time x FLOP ratio)" if j == 0 else None)
    if ideal:
        ax_t.legend(loc="upper left", fontsize=8)
    ax_t.set_ylabel("step time (s), median and min-max")
    ax_t.set_title("step time")
    parts = [
        ("weights: backbone", lambda s, m: s["backbone_weights"], "#8c564b"),
        ("weights: aux nets", lambda s, m: s["aux_weights"], "#c49c94"),
        ("optimizer: backbone", lambda s, m: s["backbone_optimizer"], "#e377c2"),
        ("optimizer: aux nets", lambda s, m: s["aux_optimizer"], "#f7b6d2"),
        ("input batch", lambda s, m: m["batch_bytes"], "#bcbd22"),
        ("activations", lambda s, m: m.get("activations_at_step_peak", 0), "#1f77b4"),
        ("gradients", lambda s, m: m.get("grads_at_step_peak", 0), "#ff7f0e"),
        ("other (temporaries, recomputed)", lambda s, m: max(0, m.get("other_at_peak", 0) or 0), "#c7c7c7"),
    ]
    bottom = [0.0] * len(names)
    for name, fn, color in parts:
        vals = [fn(report[n]["memory"]["state"], report[n]["memory"]) / GiB if "state" in report[n]["memory"] else 0
                for n in names]
        ax_m.bar(labels, vals, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        ratio = 1.0 if n == "bp" else vs.get(n, {}).get("peak_memory")
        if ratio is not None and "bp" in names:
            ax_m.annotate(f"{ratio:.2f}x", (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    ax_m.set_title("peak memory, everything counted (ratio to BP on top)")
    ax_m.set_ylabel("GiB")
    ax_m.legend(fontsize=7)
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=8)
    cfg = report["config"]
    fig.suptitle(f"{report.get('model')} K={cfg['layers']} d={cfg['aux_depth']} tau={cfg['pyramid']} batch {cfg['batch']} "
                 f"{'x'.join(str(v) for v in cfg['input_size'])} on {cfg['device']}"
                 f"{' bf16' if cfg.get('amp') else ''}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
