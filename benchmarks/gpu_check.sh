#!/usr/bin/env bash
# GPU check, one call on a GPU machine, under 8 minutes: GPU description, the CUDA tests, the
# training-step benchmark (ResNet-50, 224 px, 16 triplets: fp32 eager vs the fast options) and
# bench_epoch with the image cache. Output (logs, JSON) goes to $OUT if set, else to ./gpu_check_out.
#   bash benchmarks/gpu_check.sh
# Each stage has a timeout; a stage that fails or times out is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
DATA="$(mktemp -d)"                     # SynthFashion for bench_epoch: outside $OUT, removed at exit
trap 'rm -rf "$DATA"' EXIT
STATUS=0

stage() {  # stage NAME SECONDS CMD...: run CMD with a timeout, log to $OUT_DIR/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || STATUS=1
}

json_of() {  # json_of LOG JSONFILE: the benchmark's last 'JSON: ' line as a file
    grep '^JSON: ' "$1" | tail -n 1 | sed 's/^JSON: //' >"$2" || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt" || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())' \
    | tee -a "$OUT_DIR/gpu.txt"

# CUDA tests (AMP, channels_last, torch.compile, mAP GPU = CPU, NCCL DDP with >1 GPU) and the
# torchrun/cache tests, which also run on CPUs.
stage tests_cuda 140 "$PY" -m pytest -q tests/test_cuda.py tests/test_imagecache.py tests/test_distributed.py

# Training step: fp32 eager (the original) against the fast options, ResNet-50, 224 px, 16 triplets.
stage bench_train_step 140 "$PY" benchmarks/bench_train_step.py --backbone resnet50 --img-size 224 \
    --batch-size 16 --warmup 3 --steps 10 --configs "fp32 3-forward (original)" "bf16 channels_last" \
    "bf16 channels_last concat" "fp16 channels_last" "bf16 channels_last +compile"
json_of "$OUT_DIR/bench_train_step.log" "$OUT_DIR/bench_train_step.json"

# One SynthFashion epoch: default, fast, fast + --cache-images, and the training steps alone.
stage bench_epoch 140 "$PY" benchmarks/bench_epoch.py --data_path "$DATA" \
    --synth-images 2000 --num_triplets 4000 --img-size 128 --workers 4
json_of "$OUT_DIR/bench_epoch.log" "$OUT_DIR/bench_epoch.json"

echo "gpu_check: status $STATUS; logs and JSON in $OUT_DIR"
exit "$STATUS"
