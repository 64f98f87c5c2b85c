"""Print the markdown tables of docs/benchmarks.md from the JSON files in benchmarks/results/.

    python benchmarks/tables.py            # all tables
    python benchmarks/tables.py planner    # one of: aux, depth, convert, planner, sweep, peers
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def aux() -> str:
    rows = _load("aux_overhead.json") or []
    taus = sorted({r["pyramid"] for r in rows})
    out = ["| model | K | d | " + " | ".join(f"aux FLOPs, tau={t}" for t in taus) + " | aux params (tau=0.5) | "
           "predicted peak vs BP, batch 64 (tau=0 / 0.5 / 1) |",
           "|---|---|---|" + "---|" * len(taus) + "---|---|"]
    for key in dict.fromkeys((r["model"], r["layers"], r["aux_depth"]) for r in rows):
        sel = {r["pyramid"]: r for r in rows if (r["model"], r["layers"], r["aux_depth"]) == key}
        peaks = " / ".join(f"{sel[t]['predicted_peak_ratio_b64']:.2f}x" for t in (0.0, 0.5, 1.0)
                           if "predicted_peak_ratio_b64" in sel.get(t, {}))
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{sel[t]['aux_flop_overhead']:.2f}x" for t in taus)
                   + f" | {sel[0.5]['aux_param_overhead']:.2f}x | {peaks or '-'} |")
    return "\n".join(out)


def depth() -> str:
    rows = _load("depth_sweep.json") or []
    out = ["| d | tau | variant | step FLOPs vs BP | step time vs BP (median wall) | vs ideal (wall) | vs ideal (CPU time) "
           "| peak vs BP | activations vs BP | BP / AugLocal peak |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        variant = ", ".join(v for v, on in (("bf16 autocast", r.get("amp")), ("channels_last", r.get("channels_last")),
                                            ("one global optimizer step", not r.get("layer_step", True))) if on) or "-"
        out.append(
            f"| {r['aux_depth']} | {r['pyramid']} | {variant} | {r['step_flops_vs_bp']:.2f}x | {r['step_time_ratio']:.2f}x "
            f"| {r['step_time_vs_ideal']:.2f}x | {r['cpu_time_vs_ideal']:.2f}x | {r['peak_ratio']:.2f}x "
            f"| {r['activation_ratio']:.2f}x | {r['bp_peak'] / 2**20:.0f} / {r['auglocal_peak'] / 2**20:.0f} MiB |")
    return "\n".join(out)


def convert() -> str:
    doc = _load("convert_time.json") or {}
    out = []
    r50, base = doc.get("resnet50_k17"), doc.get("resnet50_k17_baseline")
    if r50:
        out += ["| resnet50 K=17 | first conversion in a fresh process | then, median of 3 (wall / CPU) |", "|---|---|---|"]
        if base:
            out.append(f"| before issue 6 (real-tensor shape propagation, no adapter memo) | {base['first_s']:.2f} s "
                       f"| {base['median_s']:.2f} s / {base['median_cpu_s']:.2f} s |")
        out.append(f"| now | {r50['first_s']:.2f} s | {r50['median_s']:.2f} s / {r50['median_cpu_s']:.2f} s |")
        out.append("")
    zoo = doc.get("zoo") or []
    if zoo:
        out += ["| model | K (one unit per layer) | params | aux params | convert, median (wall / CPU) |",
                "|---|---|---|---|---|"]
        for r in zoo:
            if "error" in r:
                out.append(f"| {r['model']} | - | - | - | error: {r['error']} |")
            else:
                out.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['aux_params'] / 1e6:.1f}M "
                           f"| {r['median_s']:.2f} s / {r['median_cpu_s']:.2f} s |")
        ok = [r for r in zoo if "error" not in r]
        if ok:
            worst = max(ok, key=lambda r: r["median_s"])
            out.append(f"\nslowest: {worst['model']} {worst['median_s']:.2f} s; "
                       f"{sum(r['median_s'] < 5 for r in ok)}/{len(ok)} under 5 s")
    return "\n".join(out)


def planner() -> str:
    rows = _load("planner_accuracy.json") or []
    out = ["| model | K | d | batch | BP predicted / measured | ratio | AugLocal predicted / measured | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["bp"], r["auglocal"]
        src = " (target run)" if r.get("source") else ""
        out.append(
            f"| {r['model']}{src} | {r['layers']} | {r['aux_depth']} | {r['batch']} "
            f"| {b['predicted'] / GiB:.3f} / {b['measured'] / GiB:.3f} GiB | {b['predicted_vs_measured']:.3f} "
            f"| {a['predicted'] / GiB:.3f} / {a['measured'] / GiB:.3f} GiB | {a['predicted_vs_measured']:.3f} |")
    return "\n".join(out)


def sweep() -> str:
    rows = _load("planner_batch_sweep.json") or []
    out = ["| batch | BP predicted | AugLocal predicted | AugLocal/BP | AugLocal state / activations |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['batch']} | {r['bp'] / GiB:.2f} GiB | {r['auglocal'] / GiB:.2f} GiB | {r['ratio']:.2f}x "
                   f"| {r['auglocal_state'] / GiB:.2f} / {r['auglocal_activations'] / GiB:.2f} GiB |")
    return "\n".join(out)


def peers(name: str = "peers_resnet50_k17_d2_b64_cpu.json") -> str:
    """Every method of one `auglocal bench --methods ...` run: absolute figures and ratios to BP."""
    doc = _load(name)
    if not doc:
        return f"(no {name})"
    labels = doc.get("labels") or {}
    vs = doc.get("vs_bp") or {}
    out = ["| method | step time (wall / CPU) | images/s | FLOPs/step | peak memory (measured) | activations at peak "
           "| other at peak | peak vs BP | time vs BP (wall / CPU) | memory x time vs BP (wall / CPU) "
           "| time vs FLOP-ideal (wall / CPU) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in doc["methods"]:
        r, v = doc[m], vs.get(m, {})
        mem, f = r["memory"], r["flops_per_step"]
        if m != "bp" and v.get("peak_memory") is not None and v.get("cpu_time") is not None:
            v = {**v, "memory_x_cpu_time": v["peak_memory"] * v["cpu_time"]}
        ratio = lambda k: "1.00x" if m == "bp" else (f"{v[k]:.2f}x" if v.get(k) is not None else "-")  # noqa: E731
        out.append(
            f"| {labels.get(m, m)} | {r['time']['median_s']:.1f} / {r['time']['cpu']['median_s']:.1f} s "
            f"| {r['time']['images_per_s']:.2f} | {(f['backbone'] + f['aux']) / 1e9:.0f} G | {mem['peak'] / GiB:.2f} GiB "
            f"| {mem['activations_at_step_peak'] / GiB:.2f} GiB | {mem.get('other_at_peak', 0) / GiB:.2f} GiB "
            f"| {ratio('peak_memory')} | {ratio('step_time')} / {ratio('cpu_time')} "
            f"| {ratio('memory_x_time')} / {ratio('memory_x_cpu_time')} "
            f"| {ratio('step_time_vs_ideal')} / {ratio('cpu_time_vs_ideal')} |")
    return "\n".join(out)


TABLES = {"aux": aux, "depth": depth, "convert": convert, "planner": planner, "sweep": sweep, "peers": peers}

if __name__ == "__main__":
    for name in sys.argv[1:] or TABLES:
        print(f"<!-- {name} -->\n{TABLES[name]()}\n")
