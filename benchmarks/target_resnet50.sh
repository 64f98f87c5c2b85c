#!/bin/sh
# The issue's target configuration: torchvision ResNet-50, K=17 (one unit per local layer), d=2, tau=0.5,
# 224x224, batch 64, SGD with momentum 0.9 (fused), AugLocal stepping each layer's optimizer after its backward.
# On the 2-core CPU of the development machine one run takes 20-40 minutes (BP step ~40 s, AugLocal ~100 s).
#   benchmarks/target_resnet50.sh                      # -> results/resnet50_k17_d2_b64_cpu.{json,png}
#   STEPS=5 benchmarks/target_resnet50.sh --json ... --plot ...   # extra options go to `auglocal bench`
#   AUX_DEPTH=1 STEPS=1 benchmarks/target_resnet50.sh  # -> results/resnet50_k17_d1_b64_cpu.{json,png}
#   DEVICE=cuda benchmarks/target_resnet50.sh          # on a GPU machine
set -e
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
STEPS=${STEPS:-3}
DEPTH=${AUX_DEPTH:-2}
auglocal bench resnet50 --layers 17 --aux-depth "$DEPTH" --pyramid 0.5 --batch 64 --device "$DEVICE" \
    --steps "$STEPS" --warmup 1 \
    --json "benchmarks/results/resnet50_k17_d${DEPTH}_b64_${DEVICE}.json" \
    --plot "benchmarks/results/resnet50_k17_d${DEPTH}_b64_${DEVICE}.png" "$@"
