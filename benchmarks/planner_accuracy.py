"""The memory planner against the benchmark: predicted vs measured peak memory, BP and AugLocal, several models.

For each configuration: `plan_memory` predicts (no training step), then `run_benchmark` measures (one warm-up and
one timed step of each method, then the instrumented memory step). A second table sweeps the batch size of the
issue's target (resnet50, K=17, d=2, tau=0.5) with the planner alone, to show where AugLocal's peak crosses 0.5x
BP's. The target configuration itself is measured by benchmarks/target_resnet50.sh; its JSON, when present, is
compared with the planner here too.

    python benchmarks/planner_accuracy.py            # all configurations (about 30 minutes on 2 CPU cores)
    python benchmarks/planner_accuracy.py --only resnet32
Writes benchmarks/results/planner_accuracy.json (rewritten after every configuration) and planner_batch_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"

CONFIGS = [
    # name, K, d, tau, batch, input size
    ("auglocal:resnet32", 16, 2, 0.5, 256, (3, 32, 32)),
    ("resnet50", 17, 2, 0.5, 16, (3, 224, 224)),
    ("resnet50", 9, 1, 0.5, 16, (3, 224, 224)),
    ("resnet50", 4, 2, 0.5, 16, (3, 224, 224)),
    ("mobilenet_v3_large", 6, 2, 0.5, 32, (3, 224, 224)),
    ("timm:vit_tiny_patch16_224", 7, 2, 0.5, 16, (3, 224, 224)),
]
TARGET_JSON = OUT / "resnet50_k17_d2_b64_cpu.json"


def _entry(name, k, d, tau, batch, size, plan, bench):
    cand = plan["candidates"][0]["detail"]
    out = {"model": name, "layers": k, "aux_depth": d, "pyramid": tau, "batch": batch, "input_size": list(size)}
    for method, pred in (("bp", plan["bp"]), ("auglocal", cand)):
        mem = bench[method]["memory"]
        out[method] = {
            "predicted": pred["predicted_peak"],
            "measured": mem.get("measured_peak"),
            "accounted": mem["accounted_peak"],
            "predicted_vs_measured": pred["predicted_peak"] / mem["measured_peak"] if mem.get("measured_peak") else None,
            "predicted_vs_accounted": pred["predicted_peak"] / mem["accounted_peak"],
        }
    out["ratio_predicted"] = cand["predicted_peak"] / plan["bp"]["predicted_peak"]
    out["ratio_measured"] = bench["ratios"].get("measured_peak")
    out["planner_seconds"] = plan["seconds"]
    return out


def main() -> None:
    import auglocal_fx
    from auglocal_fx.bench import BenchConfig, run_benchmark
    from auglocal_fx.hub import create_model
    from auglocal_fx.planner import plan_memory

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=None, help="run the configurations whose model name contains this")
    parser.add_argument("--skip-measure", action="store_true", help="planner batch sweep and target comparison only")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "planner_accuracy.json"
    results = json.loads(path.read_text()) if path.exists() else []
    if not args.skip_measure:
        for name, k, d, tau, batch, size in CONFIGS:
            if args.only and args.only not in name:
                continue
            torch.manual_seed(0)
            model = create_model(name)
            plan = plan_memory(model, batch=batch, layers=[k], aux_depths=[d], pyramid=tau, input_size=size)
            lm = auglocal_fx.convert(model, layers=k, aux_depth=d, pyramid=tau, input_size=size)
            del model
            t0 = time.perf_counter()
            bench = run_benchmark(lm, BenchConfig(batch=batch, steps=1, warmup=1))
            del lm
            entry = _entry(name, k, d, tau, batch, size, plan, bench)
            entry["bench_seconds"] = time.perf_counter() - t0
            results = [r for r in results if (r["model"], r["layers"], r["aux_depth"], r["batch"]) != (name, k, d, batch)]
            results.append(entry)
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name} K={k} d={d} b={batch}: BP predicted/measured {entry['bp']['predicted_vs_measured']:.3f}, "
                  f"AugLocal {entry['auglocal']['predicted_vs_measured']:.3f}", flush=True)

    # The target configuration: planner vs the measured run of benchmarks/target_resnet50.sh, and a batch sweep.
    model = create_model("resnet50")
    sweep = []
    for batch in (16, 32, 64, 96, 128, 256):
        plan = plan_memory(model, batch=batch, layers=[17], aux_depths=[2], pyramid=0.5)
        cand = plan["candidates"][0]
        sweep.append({"batch": batch, "bp": plan["bp"]["predicted_peak"], "auglocal": cand["predicted_peak"],
                      "ratio": cand["ratio_to_bp"],
                      "auglocal_state": sum(v for g in cand["detail"]["state"].values() for v in g.values()),
                      "auglocal_activations": cand["detail"]["activations_peak"],
                      "bp_activations": plan["bp"]["step"]["activations_peak"]})
        print(f"resnet50 K=17 d=2 batch {batch}: predicted AugLocal/BP {cand['ratio_to_bp']:.3f}", flush=True)
        if batch == 64 and TARGET_JSON.exists():
            target = json.loads(TARGET_JSON.read_text())
            entry = _entry("resnet50", 17, 2, 0.5, 64, (3, 224, 224), plan, target)
            entry["source"] = str(TARGET_JSON.relative_to(ROOT.parent))
            results = [r for r in results if r.get("source") is None or r["source"] != entry["source"]]
            results.append(entry)
            path.write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "planner_batch_sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")


if __name__ == "__main__":
    main()
