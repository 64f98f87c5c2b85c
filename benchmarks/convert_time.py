"""How long `auglocal_fx.convert` takes: resnet50 K=17 (target < 1 s) and a set of zoo models (target < 5 s).

Each model is converted in a warm process (torch imported and one conversion done, so that one-time imports, e.g.
torch._dynamo which FlopCounterMode loads on first use, are not charged to a model) with one local layer per unit,
the largest K, and the model's native input size; the median of 3 conversions is reported, wall and process CPU
time. The first conversion in a fresh process is reported apart for resnet50. `--baseline` re-runs resnet50 with
the two convert speed-ups of issue 6 switched off (real-tensor shape propagation, no adapter-spec memo).

    python benchmarks/convert_time.py
Writes benchmarks/results/convert_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results"

ZOO = [
    # torchvision: the zoo harness's fast subset, and resnet50
    "resnet18", "resnet50", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121",
    "googlenet", "efficientnet_b0", "regnet_x_400mf", "mobilenet_v2", "convnext_tiny", "swin_t", "vit_b_16",
    # timm
    "timm:resnet50", "timm:vit_small_patch16_224", "timm:convnext_tiny", "timm:efficientnet_b0",
    "timm:swin_tiny_patch4_window7_224", "timm:regnety_016", "timm:deit_tiny_patch16_224", "timm:mobilevitv2_050",
]

_CHILD = r"""
import json, sys, time, torch
import auglocal_fx
from auglocal_fx.hub import create_model
name, layers, repeats, baseline = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
if baseline:
    import auglocal_fx._shapes as S
    orig = S.ShapeFlopProp._propagate
    S.ShapeFlopProp._propagate = lambda self, args, fake: orig(self, args, fake=False)
    conv = sys.modules["auglocal_fx.rules.auglocal"]
model = create_model(name)
if layers == "max":
    inspection = auglocal_fx.inspect_model(model)
    layers = min(inspection.max_layers, len(inspection.units))
layers = int(layers)
out = {"model": name, "layers": layers, "params": sum(p.numel() for p in model.parameters())}
times, cpu = [], []
for i in range(repeats + 1):
    if baseline:
        conv._cached_adapter_spec.cache_clear()
    c0, t0 = time.process_time(), time.perf_counter()
    lm = auglocal_fx.convert(model, layers=layers)
    times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    out["aux_params"] = sum(p.numel() for p in lm.aux_parameters())
    del lm
out["first_s"], out["first_cpu_s"] = times[0], cpu[0]
out["median_s"], out["median_cpu_s"] = sorted(times[1:])[len(times[1:]) // 2], sorted(cpu[1:])[len(cpu[1:]) // 2]
out["times_s"], out["cpu_s"] = times, cpu
print("RESULT " + json.dumps(out))
"""


def run_child(name: str, layers: str = "max", repeats: int = 3, baseline: bool = False) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, name, layers, str(repeats), "1" if baseline else "0"],
                          capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"model": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "convert_time.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["load_average_start"] = list(os.getloadavg())
    r50 = run_child("resnet50", "17", repeats=3)
    doc["resnet50_k17"] = r50
    print(f"resnet50 K=17: first conversion in a fresh process {r50['first_s']:.2f} s, then median "
          f"{r50['median_s']:.2f} s wall / {r50['median_cpu_s']:.2f} s CPU", flush=True)
    if args.baseline:
        base = run_child("resnet50", "17", repeats=3, baseline=True)
        if "error" in base:
            raise SystemExit(f"baseline run failed: {base['error']}")
        doc["resnet50_k17_baseline"] = base
        print(f"resnet50 K=17 baseline (before issue 6): first {base['first_s']:.2f} s, median {base['median_s']:.2f} s "
              f"wall / {base['median_cpu_s']:.2f} s CPU", flush=True)
    zoo = []
    for name in args.models or ZOO:
        res = run_child(name, "max", repeats=3)
        zoo.append(res)
        if "error" in res:
            print(f"{name}: error {res['error']}", flush=True)
        else:
            print(f"{name} K={res['layers']}: median {res['median_s']:.2f} s wall / {res['median_cpu_s']:.2f} s CPU "
                  f"(aux params {res['aux_params'] / 1e6:.1f}M)", flush=True)
        doc["zoo"] = zoo
        path.write_text(json.dumps(doc, indent=2) + "\n")
    doc["load_average_end"] = list(os.getloadavg())
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
