"""Every local-learning rule on every timm ``test_*`` model: convert, eval equivalence, one local step.

Usage::

    python benchmarks/rules_zoo.py [--out benchmarks/results/rules_zoo.json] [--models test_vit,test_resnet]

For each (model, rule): converts with K = min(4, largest K), checks that the LocalModel's eval output equals the
model's bit for bit, runs one ``local_step`` and checks every parameter got a gradient. Prints one line per
pair and a summary; writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import timm
import torch

import auglocal_fx

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check(name: str, rule: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    size = tuple(model.pretrained_cfg["input_size"])
    layers = min(4, auglocal_fx.inspect_model(model, input_size=size).max_layers)
    t0 = time.perf_counter()
    lm = auglocal_fx.convert(model, layers=layers, input_size=size, rule=rule)
    seconds = time.perf_counter() - t0
    x = torch.randn(2, *size)
    with torch.no_grad():
        equal = torch.equal(lm.eval()(x), model(x))
    lm.train()
    lm.local_step(x, torch.tensor([1, 3]), mean=MEAN[: size[0]], std=STD[: size[0]])
    missing = [n for n, p in lm.named_parameters() if p.requires_grad and p.grad is None]
    return {"layers": layers, "equal": equal, "params_without_grad": len(missing), "convert_s": round(seconds, 3),
            "aux_params": sum(a.params for a in lm.plan.aux), "ok": equal and not missing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=None, help="comma-separated timm names (default: every test_* model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else timm.list_models("test_*")
    results = {}
    for name in models:
        for rule in auglocal_fx.list_rules():
            try:
                row = check(name, rule)
            except Exception as exc:  # a failure is a result here, reported with its reason
                row = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                       "where": traceback.format_exc().splitlines()[-3][:200]}
            results[f"{name}/{rule}"] = row
            print(f"{name:24s} {rule:9s} {'ok' if row['ok'] else 'FAIL'} {row.get('error', '')}", flush=True)
    ok = sum(r["ok"] for r in results.values())
    print(f"{ok}/{len(results)} model-rule pairs convert, match the model in eval mode and train every parameter")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "timm": timm.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
