#!/usr/bin/env bash
# Everything worth checking on a lent GPU, in one call (the device tool's `run`), results under $OUT.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU at tiny sizes (CI runs this)
#
# The lent machines run Python 3.12 with torch 2.11, transformers, safetensors, tokenizers, pybind11,
# pyyaml, tensorboard and psutil, but no network and no megatron-core. Before the call, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.16.1 zstandard
# then run with carry [".whl"]:  bash benchmarks/gpu_check.sh
#
# Steps (each with its own timeout, so one failure or hang does not cost the rest; each step's full
# output in $OUT/<step>.log, a digest in $OUT/gpu_check.log, a table of the steps in $OUT/summary.md,
# the RESULTS.md sections in $OUT/RESULTS.gpu.md - copy those into benchmarks/RESULTS.md):
#   machine     what the attention backend choice sees (TE / cuDNN / flash-attn / FlexAttention) and picks;
#   parity      HF parity of the model on the device for every backend (sdpa, flex compiled, flash
#               through its test reference; fp32 and bf16, eval, TP1/PP1: the path without the CPU
#               adapter), the real flash-attn kernel against its reference where flash_attn imports,
#               and the bf16 RoPE test (megatron's Float16Module on the device);
#   attention   benchmarks/attention_backends.py: one global + one local layer's core attention,
#               fwd+bwd time and peak memory, sdpa vs flex (vs flash) at 16 x 1024 and 2 x 8192
#               tokens (goal: flex >= 2x SDPA at 8192);
#   model-*     forward+backward tokens/s and MFU against HF ModernBertForMaskedLM, bf16, with the
#               backend auto picks: mmbert-base at 1024 and 8192 tokens, mmbert-small at 1024
#               (goal at 1024: >= 1.5x HF and 35% MFU);
#   train       training-step throughput, MFU and the share outside forward/backward of mmbert-base at
#               its real micro-batch (48 x 1024), amp_bf16 (fp32 weights, bf16 autocast, as the shipped
#               configs), distributed optimizer: one process per GPU,
#               on a synthetic corpus made on the spot (no gettext catalogs needed);
#   host-syncs  step time with and without the host syncs issue 18 removed.
# Steps run in that order of importance. The whole check keeps to BUDGET seconds (default 540 on a
# GPU, so one 10-minute device call holds it with room to copy results): each step gets its own
# timeout (x3 in a dry run), cut to what is left of the budget; a step with under 20 s left is
# skipped and says so.
# Environment: OUT (output folder), PYTHON (interpreter, default python3), BUDGET, STEP_TIMEOUT
# (overrides every step's own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export MMBERT_RESULTS="$OUT/RESULTS.gpu.md"   # where the benchmarks' --append writes (not the repo)
: > "$LOG"
: > "$MMBERT_RESULTS"

if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import megatron_mmbert.data._index_builder" 2>/dev/null; then
    "$PYTHON" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "extension build failed"; tail -20 "$OUT/build.log"; }
fi

if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: the GPU check's steps on CPU at tiny sizes (the numbers mean nothing)" | tee -a "$LOG"
    DEVICE=cpu; NPROC=1; BUDGET=${BUDGET:-1400}; SCALE=3   # a shared 2-core CI box: 3x each step's time
    PARITY_TESTS="tests/test_model_parity.py tests/test_rope_precision.py tests/test_packed_attention.py"
    PARITY_SELECT="tp1_pp1 and packed and even or loss_matches or angles or real_flash"
    ATTENTION="--device cpu --shapes 2x128 --iters 1"
    SMALL="--device cpu --precision fp32 --preset tiny --rows 1 --seq-len 128 --iters 1 --rounds 1"
    BASE="$SMALL"
    BASE_LONG="$SMALL"
    TRAIN="--device cpu --nproc 1 --preset tiny --precision amp_bf16 --distributed-optimizer --steps 4 --rows 4 --micro-rows 2 --seq-len 64 --interval 2"
    SYNCS="--device cpu --preset tiny --tokens 256 --rows 1 --seq-len 64 --micro-batches 1 --rounds 1"
else
    DEVICE=cuda; BUDGET=${BUDGET:-540}; SCALE=1
    NPROC=$(nvidia-smi -L | wc -l)   # one training process per GPU
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    PARITY_TESTS="tests/test_model_parity.py tests/test_rope_precision.py tests/test_packed_attention.py"
    PARITY_SELECT="tp1_pp1 or bf16_parity or loss_matches or rope or real_flash"
    ATTENTION="--device cuda --shapes 16x1024,2x8192 --iters 5"
    SMALL="--device cuda --precision bf16 --preset mmbert-small --rows 16 --seq-len 1024 --iters 10 --rounds 3"
    BASE="--device cuda --precision bf16 --preset mmbert-base --rows 16 --seq-len 1024 --iters 10 --rounds 3"
    BASE_LONG="--device cuda --precision bf16 --preset mmbert-base --rows 2 --seq-len 8192 --iters 5 --rounds 2"
    # mmbert-base's real pre-training micro-batch (48 x 1024), amp_bf16 (the shipped configs'
    # precision), distributed optimizer
    TRAIN="--device cuda --nproc $NPROC --preset mmbert-base --precision amp_bf16 --distributed-optimizer --steps 20 --rows $((48 * NPROC)) --micro-rows 48 --seq-len 1024 --interval 5"
    SYNCS="--device cuda"
fi

printf '| step | status | seconds |\n|---|---|---|\n' > "$SUMMARY"
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run with min(SECONDS, budget left), full log to $OUT/NAME.log
    local name=$1 limit=$((${STEP_TIMEOUT:-$2} * SCALE)); shift 2
    local start=$SECONDS status
    local left=$((BUDGET - SECONDS - 10))   # 10 s for --kill-after and the summary
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "-- $name: SKIPPED (budget of ${BUDGET}s spent)" | tee -a "$LOG"
        echo "| $name | SKIPPED (budget) | 0 |" >> "$SUMMARY"; FAILED=1
        return
    fi
    echo "== $name (${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    grep -v -i "warn" "$OUT/$name.log" | tail -25 | tee -a "$LOG"
    echo "-- $name: $status" | tee -a "$LOG"
    echo "| $name | $status | $((SECONDS - start)) |" >> "$SUMMARY"
}

step machine 60 "$PYTHON" -c "
from megatron_mmbert.model.backends import choose_backend, probe
m = probe(); print(m.describe())
for precision in ('fp32', 'bf16'):
    c = choose_backend('auto', precision, m)
    print(precision, '->', c.describe()); [print('  note:', n) for n in c.notes]"
# shellcheck disable=SC2086
step parity 200 "$PYTHON" -m pytest -q -p no:cacheprovider $PARITY_TESTS -k "$PARITY_SELECT"
# shellcheck disable=SC2086
step attention 120 "$PYTHON" benchmarks/attention_backends.py $ATTENTION --append
# shellcheck disable=SC2086
step model-base 90 "$PYTHON" benchmarks/model_throughput.py $BASE --append
# shellcheck disable=SC2086
step model-base-8192 90 "$PYTHON" benchmarks/model_throughput.py $BASE_LONG --append
# shellcheck disable=SC2086
step train 120 "$PYTHON" benchmarks/train_throughput.py $TRAIN --append
# shellcheck disable=SC2086
step model-small 60 "$PYTHON" benchmarks/model_throughput.py $SMALL --append
# shellcheck disable=SC2086
step host-syncs 60 "$PYTHON" benchmarks/host_syncs.py $SYNCS --append

[ "$DRY_RUN" = 1 ] && echo "DRY RUN finished (CPU, tiny sizes)" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
echo "results: $MMBERT_RESULTS (copy into benchmarks/RESULTS.md)"
exit $FAILED
