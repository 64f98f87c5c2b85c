"""Aux nets' FLOP and parameter overhead for several aux depths d and pyramid coefficients tau (from the plans).

For each model and K, converts nothing: the model is traced once and the plan of every (d, tau) gives the aux
nets' forward FLOPs and parameters relative to the backbone's; for resnet50 K=17 the planner also predicts the
peak memory at batch 64 (224x224) relative to BP's. Writes benchmarks/results/aux_overhead.json and
aux_overhead.png; docs/benchmarks.md shows the table.

    python benchmarks/aux_overhead.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"

MODELS = [
    # (hub name, K, input size)
    ("resnet50", 17, (3, 224, 224)),  # the target model, one unit per layer
    ("resnet50", 9, (3, 224, 224)),
    ("auglocal:resnet32", 16, (3, 32, 32)),  # the paper's CIFAR settings
    ("auglocal:resnet110", 55, (3, 32, 32)),
]
DEPTHS = (1, 2, 3, 4)
TAUS = (0.0, 0.25, 0.5, 1.0)


def main() -> None:
    from auglocal_fx.hub import create_model
    from auglocal_fx.planner import _convert_module

    conv = _convert_module()
    rows = []
    for name, k, size in MODELS:
        torch.manual_seed(0)
        model = create_model(name)
        analysis = conv._analyze(model, input_size=size, leaf_modules=None)
        for d in DEPTHS:
            for tau in TAUS:
                plan = conv._make_plan(analysis, layers=k, aux_depth=d, pyramid=tau, aux_init="copy", cuts=None,
                                       leaf_modules=None, source=None)
                bb_flops = sum(layer.flops for layer in plan.layers)
                bb_params = sum(layer.params for layer in plan.layers)
                aux_flops = sum(a.flops for a in plan.aux)
                aux_params = sum(a.params for a in plan.aux)
                rows.append({
                    "model": name, "layers": k, "input_size": list(size), "aux_depth": d, "pyramid": tau,
                    "depths": [a.depth for a in plan.aux],
                    "backbone_flops": bb_flops, "aux_flops": aux_flops, "aux_flop_overhead": aux_flops / bb_flops,
                    "step_flops_vs_bp": (bb_flops + aux_flops) / bb_flops,
                    "backbone_params": bb_params, "aux_params": aux_params, "aux_param_overhead": aux_params / bb_params,
                })
                print(f"{name} K={k} d={d} tau={tau}: aux FLOPs {aux_flops / bb_flops:.2f}x, "
                      f"aux params {aux_params / bb_params:.2f}x", flush=True)
    # Predicted peak memory at the target size (planner; batch 64, SGD momentum, per-layer step) for resnet50 K=17.
    from auglocal_fx.planner import plan_memory

    for tau in TAUS:
        plan = plan_memory(create_model("resnet50"), batch=64, layers=[17], aux_depths=DEPTHS, pyramid=tau)
        for cand in plan["candidates"]:
            for r in rows:
                if (r["model"], r["layers"], r["aux_depth"], r["pyramid"]) == ("resnet50", 17, cand["aux_depth"], tau):
                    r["predicted_peak_b64"] = cand["predicted_peak"]
                    r["predicted_peak_ratio_b64"] = cand["ratio_to_bp"]
                    r["bp_predicted_peak_b64"] = plan["bp"]["predicted_peak"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "aux_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, OUT / "aux_overhead.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["model"], r["layers"]) for r in rows}, key=lambda c: [m[:2] for m in MODELS].index(c))
    fig, axes = plt.subplots(1, len(configs), figsize=(4 * len(configs), 3.6), sharey=True)
    for ax, (name, k) in zip(axes, configs):
        for tau in TAUS:
            sel = [r for r in rows if r["model"] == name and r["layers"] == k and r["pyramid"] == tau]
            ax.plot([r["aux_depth"] for r in sel], [r["aux_flop_overhead"] for r in sel], marker="o", label=f"tau={tau}")
        ax.set_title(f"{name} K={k}", fontsize=9)
        ax.set_xlabel("aux depth d")
        ax.set_xticks(DEPTHS)
    axes[0].set_ylabel("aux FLOPs / backbone FLOPs")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
