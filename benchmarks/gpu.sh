#!/usr/bin/env bash
# All the GPU work of the project in one prepared script, sized for 8 minutes on one GPU (an H200 here).
#
#   benchmarks/gpu.sh              # on the GPU machine: installs the project (no deps), runs every section
#   benchmarks/gpu.sh --dry-run    # on any CPU: the same sections at toy sizes (checks the script; CI runs it)
#
# Sections (each with its own time limit; a failing or timed-out section is recorded and the script goes on):
#   cuda_tests       pytest -m cuda (tests/test_cuda.py: equivalence, local_step grads, bf16, fp16 + GradScaler,
#                    checkpointing, save/load, bench and a short train on CUDA)
#   bench_b64        auglocal bench resnet50 K=17 d=2 224px batch 64, bf16, every method
#   infopro_b*       bp,infopro apart (its decoder may run out of memory at 224 px)
#   bench_b256       the same at batch 256 (the issue's targets: AugLocal peak <= 0.5x BP's, step time <= 1.1x
#                    its FLOP-proportional ideal)
#   variant_*        bp,checkpoint,auglocal at batch 256: fp32, bf16 + channels_last, + cudnn.benchmark,
#                    + torch.compile: each GPU option is kept only where these figures show it helps
#   train            a short `auglocal train` run on CUDA (digits, ResNet-8, bf16)
#   nccl_*           HOOK for the scale-out issues: data-parallel (--nproc-per-node 1, NCCL) and layer-parallel
#                    (--set parallel.stages=2) training; each runs only if this checkout has the option
#
# Output: $OUT (default benchmarks/results/gpu): <section>.log, bench JSON/PNG, summary.json (status, seconds,
# and each bench's headline ratios). Nothing is installed beyond `pip install --no-deps -e .`.
# ONLY=name,name,... runs those sections alone (the others are recorded as skipped), e.g. ONLY=bench_b256.
set -u -o pipefail

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
BUDGET_S="${GPU_BUDGET_S:-470}"   # stop starting sections past this (the device gives 8 minutes)
START=$(date +%s)
: > "$OUT/sections.tsv"

if [ "$DRY" = 1 ]; then
    # Toy sizes on the CPU: the same commands and options, a model that takes seconds.
    DEVICE=cpu; MODEL=auglocal:resnet8; LAYERS=4; SHAPE=(--input-size 3,32,32 --num-classes 10)
    B_SMALL=4; B_LARGE=8; STEPS=1; WARMUP=0; AMP=(); T_SCALE=4
    BUDGET_S="${GPU_BUDGET_S:-100000}"  # no device time to save: every selected section runs
else
    DEVICE=cuda; MODEL=resnet50; LAYERS=17; SHAPE=()
    B_SMALL=64; B_LARGE=256; STEPS=5; WARMUP=2; AMP=(--amp); T_SCALE=1
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu.sh: torch sees no CUDA device (use --dry-run on a CPU)" >&2; exit 1; }
    "$PY" -m pip install --no-deps -q -e . > "$OUT/install.log" 2>&1 || { echo "pip install failed: $OUT/install.log" >&2; exit 1; }
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
# InfoPro runs apart: its CIFAR-style decoder upsamples each layer's whole feature map to the input size (26 GB
# for resnet50's 2048-channel map at batch 64 in fp32: out of memory on the 23 GiB CPU machine), and one
# out-of-memory error must not lose the other methods' figures.
METHODS=bp,checkpoint,auglocal,dgl,predsim,greedy

# section NAME LIMIT_S COMMAND...: run it with a time limit, log to $OUT/NAME.log, record status and seconds.
section() {
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        printf '%s\tskipped\t0\tnot selected (ONLY=%s)\n' "$name" "$ONLY" >> "$OUT/sections.tsv"
        return 0
    fi
    local now; now=$(date +%s)
    if [ $((now - START)) -ge "$BUDGET_S" ]; then
        printf '%s\tskipped\t0\tover the time budget\n' "$name" >> "$OUT/sections.tsv"
        echo "== $name: skipped (over the ${BUDGET_S}s budget)"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=10 "$((limit * T_SCALE))" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (exit $rc)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$*" >> "$OUT/sections.tsv"
    echo "   $status in $(( $(date +%s) - t0 ))s; tail of $OUT/$name.log:"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

skip() {  # skip NAME REASON
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/sections.tsv"
    echo "== $1: skipped ($2)"
}

bench() {  # bench NAME LIMIT BATCH METHODS [extra auglocal-bench options]
    local name=$1 limit=$2 batch=$3 methods=$4; shift 4
    section "$name" "$limit" auglocal bench "$MODEL" --layers "$LAYERS" --aux-depth 2 --pyramid 0.5 \
        ${SHAPE[@]+"${SHAPE[@]}"} --batch "$batch" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
        --methods "$methods" --json "$OUT/$name.json" --plot "$OUT/$name.png" -q "$@"
}

# 1. the CUDA tests (skipped, not failed, without a GPU: the dry run checks the marker's plumbing)
section cuda_tests 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py

# 2. every method side by side, bf16 autocast, at the two batches
bench bench_b64 75 "$B_SMALL" "$METHODS" ${AMP[@]+"${AMP[@]}"}
bench bench_b256 100 "$B_LARGE" "$METHODS" ${AMP[@]+"${AMP[@]}"}

# 3. the GPU options, one at a time on top of the last, on the three main methods
bench variant_fp32 50 "$B_LARGE" bp,checkpoint,auglocal
bench variant_bf16_cl 50 "$B_LARGE" bp,checkpoint,auglocal ${AMP[@]+"${AMP[@]}"} --channels-last
bench variant_bf16_cl_cudnn 50 "$B_LARGE" bp,checkpoint,auglocal ${AMP[@]+"${AMP[@]}"} --channels-last --cudnn-benchmark
bench infopro_b64 40 "$B_SMALL" bp,infopro ${AMP[@]+"${AMP[@]}"}
bench infopro_b256 50 "$B_LARGE" bp,infopro ${AMP[@]+"${AMP[@]}"}
if [ "$DRY" = 1 ]; then
    skip variant_compile "torch.compile is measured on the GPU only (inductor needs a C compiler here)"
else
    bench variant_compile 90 "$B_LARGE" bp,auglocal ${AMP[@]+"${AMP[@]}"} --channels-last --cudnn-benchmark --compile
fi

# 4. a short training run
RECIPE="$OUT/tiny_train.yaml"
cat > "$RECIPE" <<EOF
name: gpu-smoke
model: {name: resnet8, kwargs: {width: 4}}
convert: {layers: 3, aux_depth: 2}
data: {name: digits, train_subset: 512, eval_subset: 128}
optimizer: {name: sgd, lr: 0.05}
schedule: {name: cosine}
epochs: 2
batch_size: 64
seed: 1
device: $DEVICE
amp: $([ "$DRY" = 1 ] && echo none || echo bf16)
EOF
section train 60 auglocal train "$RECIPE" -q -o "$OUT/train_run"

# 5. ===== HOOK: NCCL paths of the scale-out issues =====================================================
# Runs only the options this checkout has (checked first), so the script never fails for a missing feature.
if auglocal train --help 2>/dev/null | grep -q -- "--nproc-per-node"; then
    section nccl_data_parallel 60 auglocal train "$RECIPE" --nproc-per-node 1 -q -o "$OUT/train_dp1"
    # data-parallel step time and all-reduce wait on NCCL, one rank (docs/distributed.md, "Measured")
    section nccl_dp_bench 90 "$PY" -m auglocal_fx.distributed._bench --device "${DEVICE%%:*}" --model resnet32 \
        --batch 256 --img-size 32 --layers 4 --steps 20 --warmup 5 --threads 0 --bucket-cap-mb 4 --nproc-per-node 1
else
    skip nccl_data_parallel "this checkout has no --nproc-per-node"
fi
if auglocal train "$RECIPE" --set parallel.stages=2 --dry-run > /dev/null 2>&1; then
    # two stages = two processes (layer-parallel needs one process per stage)
    section nccl_layer_parallel 60 auglocal train "$RECIPE" --nproc-per-node 2 --set parallel.stages=2 -q -o "$OUT/train_stages2"
else
    skip nccl_layer_parallel "this checkout has no parallel.stages"
fi
# ===== end of the hook ==================================================================================

"$PY" - "$OUT" "$DRY" "$START" <<'PYEOF'
import json, sys, time
from pathlib import Path

out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
sections = []
for line in (out / "sections.tsv").read_text().splitlines():
    name, status, seconds, command = (line.split("\t") + [""] * 4)[:4]
    entry = {"name": name, "status": status, "seconds": int(seconds), "command": command}
    path = out / f"{name}.json"
    if path.is_file():
        report = json.loads(path.read_text())
        entry["vs_bp"] = {m: {k: r.get(k) for k in ("peak_memory", "step_time", "step_time_vs_ideal", "memory_x_time")}
                          for m, r in (report.get("vs_bp") or {}).items()}
        entry["bp_step_s"] = report.get("bp", {}).get("time", {}).get("median_s")
    sections.append(entry)
summary = {"dry_run": dry, "wall_s": int(time.time()) - start, "sections": sections,
           "ok": all(s["status"] in ("ok", "skipped") for s in sections)}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"summary: {out / 'summary.json'} ({summary['wall_s']} s, "
      f"{sum(s['status'] == 'ok' for s in sections)}/{len(sections)} sections ok)")
sys.exit(0 if summary["ok"] else 1)
PYEOF
