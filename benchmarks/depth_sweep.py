"""Step time and memory of AugLocal vs BP for several aux depths d and pyramid coefficients tau.

ResNet-50, K=17 (one unit per local layer), at 112x112 and batch 16 so that each configuration takes minutes, not
hours, on the 2-core CPU (the target size, 224x224 at batch 64, is 16x the work: benchmarks/target_resnet50.sh).
Each configuration is one `run_benchmark` (1 warm-up + 3 timed steps of each method, alternating, then the memory
step). Writes benchmarks/results/depth_sweep.json (rewritten after every configuration) and depth_sweep.png.

    python benchmarks/depth_sweep.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"
# (d, tau, bf16 autocast, channels_last, per-layer optimizer step)
SWEEP = [(1, 0.5, False, False, True), (2, 0.5, False, False, True), (3, 0.5, False, False, True),
         (4, 0.5, False, False, True), (2, 0.0, False, False, True), (2, 1.0, False, False, True),
         (2, 0.5, True, False, True), (2, 0.5, False, True, True), (2, 0.5, False, False, False)]
BATCH, SIZE, LAYERS = 16, (3, 112, 112), 17
STEPS = int(os.environ.get("STEPS", 3))


def main() -> None:
    import auglocal_fx
    from auglocal_fx.bench import BenchConfig, run_benchmark
    from auglocal_fx.hub import create_model

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "depth_sweep.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    for d, tau, amp, cl, ls in SWEEP:
        if any((r["aux_depth"], r["pyramid"], r["amp"], r["channels_last"], r["layer_step"]) == (d, tau, amp, cl, ls)
               for r in rows):
            continue
        torch.manual_seed(0)
        lm = auglocal_fx.convert(create_model("resnet50"), layers=LAYERS, aux_depth=d, pyramid=tau, input_size=SIZE)
        rep = run_benchmark(lm, BenchConfig(batch=BATCH, steps=STEPS, warmup=1, amp=amp, channels_last=cl,
                                            layer_step=ls))
        del lm
        r = rep["ratios"]
        rows.append({
            "model": "resnet50", "layers": LAYERS, "aux_depth": d, "pyramid": tau, "batch": BATCH, "input_size": list(SIZE),
            "amp": amp, "channels_last": cl, "layer_step": ls,
            "aux_flop_overhead_forward": rep["flops"]["aux_overhead_forward"],
            "step_flops_vs_bp": r["flops_per_step"],
            "bp_time_s": rep["bp"]["time"]["median_s"], "auglocal_time_s": rep["auglocal"]["time"]["median_s"],
            "bp_cpu_s": rep["bp"]["time"]["cpu"]["median_s"], "auglocal_cpu_s": rep["auglocal"]["time"]["cpu"]["median_s"],
            "time_spread": [rep["bp"]["time"]["spread"], rep["auglocal"]["time"]["spread"]],
            "step_time_ratio": r["step_time"], "step_time_vs_ideal": r["step_time_vs_ideal"],
            "cpu_time_vs_ideal": r["cpu_time_vs_ideal"],
            "peak_ratio": r["peak_memory"], "accounted_peak_ratio": r["accounted_peak"],
            "activation_ratio": r["activations"],
            "bp_peak": rep["bp"]["memory"]["peak"], "auglocal_peak": rep["auglocal"]["memory"]["peak"],
            "aux_params": rep["params"]["aux"], "backbone_params": rep["params"]["backbone"],
            "load_average": rep["machine"].get("load_average"),
        })
        path.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"d={d} tau={tau}{' bf16' if amp else ''}{' channels_last' if cl else ''}{'' if ls else ' global step'}: time {r['step_time']:.2f}x BP = {r['step_time_vs_ideal']:.2f}x ideal "
              f"(CPU time {r['cpu_time_vs_ideal']:.2f}x); peak {r['peak_memory']:.2f}x", flush=True)
    plot(rows, OUT / "depth_sweep.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"d={r['aux_depth']}\ntau={r['pyramid']}" + ("\nbf16" if r.get("amp") else "")
              + ("\nch.last" if r.get("channels_last") else "") + ("" if r.get("layer_step", True) else "\nglobal")
              for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [r["step_flops_vs_bp"] for r in rows], 0.4, label="FLOPs (ideal)")
    a.bar([x + 0.2 for x in xs], [r["step_time_ratio"] for r in rows], 0.4, label="step time (median)")
    a.set_xticks(list(xs), labels, fontsize=8)
    a.set_ylabel("AugLocal / BP")
    a.legend(fontsize=8)
    a.set_title("step time vs compute-proportional ideal", fontsize=9)
    b.bar(list(xs), [r["peak_ratio"] for r in rows])
    b.axhline(0.5, color="#d62728", ls="--", lw=1)
    b.set_xticks(list(xs), labels, fontsize=8)
    b.set_ylabel("AugLocal / BP peak memory")
    b.set_title("peak memory, everything counted (batch 16, 112x112)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
