#!/usr/bin/env bash
# GPU check: every figure of "one GPU at full speed" in one call of at most 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --quick    # tiny sizes: a dry run of every stage (CPU is fine)
# Stages (each with a timeout, its log in $OUT_DIR/<stage>.log, its JSON in $OUT_DIR/<stage>.json):
#   tests_cuda       pytest tests/test_cuda.py
#   authors_data     2000/300/300 JPEGs of 512 px in the authors' FashionAI layout (in the
#                    background while the tests run; outside $OUT, removed at exit)
#   bench_train_step steps alone, ResNet-50, 224 px, 16 triplets: fp32 eager, bf16 + channels_last
#                    + one concatenated forward
#   bench_epoch      one epoch of 6000 triplets on that data, ResNet-50: asen's defaults (fp32,
#                    three forwards, 4 workers, no cache) against the fast flags (bf16,
#                    channels_last, concat-forward, 12 workers) without and with --cache-images;
#                    training pass against the steps alone, train + validate times
#   bench_eval       validation metric at FashionAI's size on the CPU and the GPU
#   project_recipe   projected wall time of 200 epochs of 100000 triplets, defaults against fast
#   bench_breakdown_fast      where the time goes, fast flags
#   bench_train_step_graphs   the fast steps alone with CUDA graphs (torch.compile reduce-overhead)
#   bench_breakdown_defaults  where the time goes, asen's defaults
#   gpu_summary      the goals' table from the JSON files (gpu_summary.log)
# The stages run in this order of importance: when the budget runs out, the last ones are cut.
# Environment: PYTHON (default python3); OUT (default ./gpu_check_out); BUDGET_S (default 470,
# 1800 with --quick): stages are cut to what is left of it. tensorboardX is installed from .whl/*.whl when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
# --quick on a CPU: small sizes but slow steps, so three times the time per stage
SCALE=$((QUICK ? 3 : 1))
BUDGET_S="${BUDGET_S:-$((QUICK ? 1800 : 470))}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
DATA="$WORK/authors"
STATUS=0
START=$SECONDS
export TQDM_DISABLE=1

if ! "$PY" -c 'import tensorboardX' 2>/dev/null; then
    if compgen -G '.whl/*.whl' >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl \
            && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: tensorboardX is missing and there is no .whl/ to install it from"
    fi
fi

stage() {  # stage NAME SECONDS CMD...: CMD under a timeout cut to the budget left, logged to NAME.log
    local name="$1" limit=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET_S - (SECONDS - START) - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT_DIR/$name.log"
        STATUS=1
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    grep -v ' - asen - INFO - ' "$OUT_DIR/$name.log" | grep -v '^JSON: ' | tail -n 40
    echo "== $name: rc=$rc in $((SECONDS - start)) s (total $((SECONDS - START)) s)"
    [ "$rc" -eq 0 ] || STATUS=1
    grep '^JSON: ' "$OUT_DIR/$name.log" | tail -n 1 | sed 's/^JSON: //' >"$OUT_DIR/$name.json"
    [ -s "$OUT_DIR/$name.json" ] || rm -f "$OUT_DIR/$name.json"
}

if [ "$QUICK" -eq 1 ]; then     # tiny sizes: checks the stages run, not the speed
    DATA_ARGS=(--train 24 --eval 10 --jpeg-size 96)
    STEP_ARGS=(--backbone resnet18 --img-size 64 --batch-size 2 --warmup 1 --steps 1)
    EAGER=("fp32 3-forward (original)" "fp32 concat")
    GRAPHS=()                   # compiling takes minutes on a small CPU
    EPOCH_ARGS=(--num_triplets 8 --img-size 64 --extra "--backbone resnet18 --dim_embed 16 --batch-size 4")
    BREAK_STEPS=(--steps 1 --warmup 0 --profile 1)
    BREAK_ASEN=(--backbone resnet18 --img-size 64 --dim_embed 16 --batch-size 4)
    EVAL_ARGS=(--queries 360 --candidates 1440 --dim 128 --repeats 1)
    WORKERS=0; FAST_WORKERS=1; DATA_WORKERS=2
else
    DATA_ARGS=(--train 2000 --eval 300 --jpeg-size 512)
    STEP_ARGS=(--backbone resnet50 --img-size 224 --batch-size 16 --warmup 5 --steps 30)
    EAGER=("fp32 3-forward (original)" "bf16 channels_last concat")
    GRAPHS=("bf16 channels_last concat +reduce-overhead")
    EPOCH_ARGS=(--num_triplets 6000 --img-size 224)
    BREAK_STEPS=(--steps 100 --warmup 10 --profile 10)
    BREAK_ASEN=()
    EVAL_ARGS=()
    WORKERS=4; FAST_WORKERS=12; DATA_WORKERS=10     # 10 rendering processes leave cores to the tests
fi
FAST=(--amp bf16 --channels-last --concat-forward)
[ "$QUICK" -eq 1 ] && FAST=(--channels-last --concat-forward)     # not every CPU has bf16 kernels

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
} | tee "$OUT_DIR/gpu.txt"

# The data is written by the CPUs while the GPU runs the tests. (Empty arrays are expanded as
# ${A[@]+"${A[@]}"} below, which `set -u` accepts in every bash version.)
timeout --kill-after=5 $((200 * SCALE)) "$PY" benchmarks/authors_data.py "$DATA" "${DATA_ARGS[@]}" \
    --workers "$DATA_WORKERS" >"$OUT_DIR/authors_data.log" 2>&1 &
DATA_PID=$!

stage tests_cuda 150 "$PY" -m pytest -q -o addopts= tests/test_cuda.py      # one process: no xdist there

echo "== authors_data: waiting"
wait "$DATA_PID"
DATA_RC=$?
cat "$OUT_DIR/authors_data.log"
echo "== authors_data: rc=$DATA_RC (total $((SECONDS - START)) s)"
[ "$DATA_RC" -eq 0 ] || STATUS=1

stage bench_train_step 60 "$PY" benchmarks/bench_train_step.py "${STEP_ARGS[@]}" --configs "${EAGER[@]}"

stage bench_epoch 200 "$PY" benchmarks/bench_epoch.py --dataset FashionAI --data_path "$DATA" \
    "${EPOCH_ARGS[@]}" --workers "$WORKERS" --fast-workers "$FAST_WORKERS" --variants default fast cached

stage bench_eval 60 "$PY" benchmarks/bench_eval.py ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}

if [ -s "$OUT_DIR/bench_epoch.json" ] && [ -s "$OUT_DIR/bench_eval.json" ]; then
    stage project_recipe 20 "$PY" benchmarks/project_recipe.py --epoch "$OUT_DIR/bench_epoch.json" \
        --eval "$OUT_DIR/bench_eval.json"
else
    echo "== project_recipe: skipped, bench_epoch or bench_eval gave no JSON"
    STATUS=1
fi

stage bench_breakdown_fast 90 "$PY" benchmarks/bench_breakdown.py "${BREAK_STEPS[@]}" -- --dataset FashionAI \
    --data_path "$DATA" --no-pretrained ${BREAK_ASEN[@]+"${BREAK_ASEN[@]}"} "${FAST[@]}" --workers "$FAST_WORKERS"

if [ -n "${GRAPHS[*]-}" ]; then
    stage bench_train_step_graphs 150 "$PY" benchmarks/bench_train_step.py "${STEP_ARGS[@]}" --configs "${GRAPHS[@]}"
fi

stage bench_breakdown_defaults 70 "$PY" benchmarks/bench_breakdown.py "${BREAK_STEPS[@]}" -- --dataset FashionAI \
    --data_path "$DATA" --no-pretrained ${BREAK_ASEN[@]+"${BREAK_ASEN[@]}"} --workers "$WORKERS"

echo "== goals"
"$PY" benchmarks/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/gpu_summary.log"
echo "gpu_check: status $STATUS in $((SECONDS - START)) s; logs and JSON in $OUT_DIR"
exit "$STATUS"
