#!/usr/bin/env bash
# Everything worth checking on a lent GPU, in one call (the device tool's `run`), results under $OUT.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on CPU at tiny sizes
#   bash benchmarks/device_rehearsal.sh       # the dry run in a copy of the lent machine's
#                                             # environment (no megatron-core installed, carried
#                                             # wheels, no network): what CI runs
#
# The lent machines run Python 3.12 with torch 2.11 + Triton, transformers, safetensors, tokenizers,
# pybind11, pyyaml, tensorboard, psutil and pytest, but no network, no megatron-core, no zstandard,
# no TransformerEngine, no flash-attn and no gettext catalogs. Before the call, on this machine:
#   python3 benchmarks/device_env.py wheels   # .whl/: megatron-core 0.16.1 + zstandard for cp312,
#                                             # git-ignored, checked against the 64 MiB carry limit
# then run with carry [".whl"] and timeout_s 600:  bash benchmarks/gpu_check.sh
# The wheels are installed with `pip install --target /tmp/site` and reached through PYTHONPATH,
# which every step and every process a step launches (torchrun workers included) inherits.
#
# What comes back (at most 8 files): $OUT/gpu_check.log (every step's whole output, in order),
# $OUT/summary.md (a table of the steps), $OUT/RESULTS.gpu.md (the benchmarks' RESULTS.md sections:
# copy them into benchmarks/RESULTS.md), $OUT/train_run.log (the training run's own output).
#
# Steps, in order of what the call must bring back; docs/training.md "The first GPU call" says how
# to read each:
#   imports     megatron-core, the extension and torch import (nothing else runs without them);
#               what the attention backend choice sees (TE / cuDNN / flash-attn / FlexAttention)
#               and picks at each precision;
#   model       benchmarks/model_throughput.py, ONE process for every configuration so the compiled
#               FlexAttention kernels are shared: forward+backward tokens/s and MFU against HF
#               ModernBertForMaskedLM: mmbert-base at 48 x 1024 in amp_bf16 (the shipped
#               precision) and bf16, at 6 x 8192 and mmbert-small at 48 x 1024 in amp_bf16 (goal
#               at 1024: >= 1.5x HF and 35% MFU). 48 x 1024 and 6 x 8192 are the same packed token
#               count, the train step's: one flex compilation (Inductor's on-disk cache) serves all.
#               Local attention blocks (--local-blocks 128,64): the first run also times our model
#               with 128 x 64 FlexAttention blocks on the local layers (model.local_attention_block:
#               64), which decides whether CUDA's default moves from 128 x 128 (docs/training.md);
#   train       benchmarks/train_throughput.py: the training loop as shipped (mmbert-base, vocab
#               256000, amp_bf16, StableAdamW, best_fit packing, distributed optimizer, 48 x 1024
#               micro-batches, one process per GPU) on a synthetic corpus made on the spot: tokens/s,
#               MFU and the step split (forward/backward timed with CUDA events). No evaluation; one
#               asynchronous checkpoint after the last measured step (--save async: the seconds the
#               step waited for it, the background write's); metrics read as they come, so a
#               cut-off run still reports;
#   parity      HF parity of the model on the device for every backend (sdpa, flex compiled, flash
#               through its test reference; fp32 and bf16, eval, TP1/PP1: the path without the CPU
#               adapter), the real flash-attn kernel against its reference where flash_attn imports,
#               and the bf16 RoPE test (megatron's Float16Module on the device);
#   attention   benchmarks/attention_backends.py: one global + one local layer's core attention,
#               fwd+bwd time and peak memory, sdpa vs flex at 6 x 8192 tokens (one shape: one flex
#               compilation in its own process; goal:
#               flex >= 2x SDPA at 8192);
#   host-syncs  step time with and without the host syncs issue 18 removed.
# Budget: the step limits add up to 480 s (STEP_LIMITS); the whole check keeps to BUDGET seconds
# (default 540, so one 10-minute device call holds it, a cold start and the copy back included):
# each step's limit is cut to what is left of the budget, and a step with under 20 s left is
# skipped and says so. A dry run scales every limit by 3 (a shared 2-core CI box).
# Environment: OUT (output folder), PYTHON (interpreter, default python3), BUDGET, STEP_TIMEOUT
# (overrides every step's own limit), TRAIN_MICRO_ROWS (default 48), SITE_DIR (where the wheels
# are installed, default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
export OUT=${OUT:-/tmp/gpu_check_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export MMBERT_RESULTS="$OUT/RESULTS.gpu.md"   # where the benchmarks' --append writes (not the repo)
: > "$LOG"
: > "$MMBERT_RESULTS"
say() { echo "$*" | tee -a "$LOG"; }

# Seconds per step; their sum is the budget of steps (tests/test_gpu_check.py holds it to 480).
STEP_LIMITS="imports=20 model=140 train=130 parity=105 attention=60 host-syncs=25"
limit_of() { local kv; for kv in $STEP_LIMITS; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

SITE_DIR=${SITE_DIR:-/tmp/site}
if [ -d .whl ]; then
    say "installing the carried wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_DIR" .whl/*.whl >> "$LOG" 2>&1 \
        || { say "FAILED: pip install --target $SITE_DIR .whl/*.whl"; exit 1; }
    export PYTHONPATH=$SITE_DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import megatron_mmbert.data._index_builder" 2>/dev/null; then
    say "building the C++ extension"
    "$PYTHON" setup.py -q build_ext --inplace >> "$LOG" 2>&1 || say "extension build FAILED (see above)"
fi

if [ "$DRY_RUN" = 1 ]; then
    say "DRY RUN: the GPU check's steps on CPU at tiny sizes (the numbers mean nothing)"
    DEVICE=cpu; NPROC=1; BUDGET=${BUDGET:-1400}; SCALE=3
    PARITY_SELECT="tp1_pp1 and packed and even or loss_matches or angles or real_flash"
    ATTENTION="--device cpu --shapes 2x128 --iters 1"
    MODEL="--device cpu --runs tiny:2x64:amp_bf16,tiny:2x64:bf16 --iters 1 --rounds 1 --local-blocks 128,64"
    TRAIN="--device cpu --nproc 1 --preset tiny --precision amp_bf16 --distributed-optimizer --overlap --steps 4 --rows 4 --micro-rows 2 --seq-len 64 --interval 2"
    SYNCS="--device cpu --preset tiny --tokens 256 --rows 1 --seq-len 64 --micro-batches 1 --rounds 1"
else
    DEVICE=cuda; BUDGET=${BUDGET:-540}; SCALE=1
    NPROC=$(nvidia-smi -L | wc -l)   # one training process per GPU
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
    PARITY_SELECT="tp1_pp1 or bf16_parity or loss_matches or rope or real_flash"
    ATTENTION="--device cuda --shapes 6x8192 --iters 5"
    MODEL="--device cuda --runs mmbert-base:48x1024:amp_bf16,mmbert-base:48x1024:bf16,mmbert-base:6x8192:amp_bf16,mmbert-small:48x1024:amp_bf16 --iters 5 --rounds 2"
    MODEL="$MODEL --local-blocks 128,64"   # local attention at 128 x 128 and 128 x 64 blocks, first run
    MICRO=${TRAIN_MICRO_ROWS:-48}
    # mmbert-base's real pre-training micro-batch (48 x 1024), as the shipped configs train
    # (amp_bf16, StableAdamW, best_fit, distributed optimizer, vocab 256000).
    # The step as a Megatron-LM user runs it: gradient reduce and parameter gather overlapped with
    # compute (--overlap). Add --recompute selective only if memory is short (it costs an attention
    # forward per layer).
    TRAIN="--device cuda --nproc $NPROC --preset mmbert-base --precision amp_bf16 --distributed-optimizer --overlap --steps 20 --rows $((MICRO * NPROC)) --micro-rows $MICRO --seq-len 1024 --interval 5"
    SYNCS="--device cuda"
fi
# The train step also saves one asynchronous checkpoint (checkpoint.async_save) at its last measured
# step and reports the seconds the step waited for it and the background write's (issue 25).
TRAIN="$TRAIN --save async"

printf '| step | status | seconds |\n|---|---|---|\n' > "$SUMMARY"
FAILED=0
step() {  # step NAME COMMAND...: run within min(its limit, budget left); output appended to $LOG
    local name=$1 limit; shift
    limit=$((${STEP_TIMEOUT:-$(limit_of "$name")} * SCALE))
    local start=$SECONDS status
    local left=$((BUDGET - SECONDS - 10))   # 10 s for --kill-after and the summary
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say "-- $name: SKIPPED (budget of ${BUDGET}s spent)"
        echo "| $name | SKIPPED (budget) | 0 |" >> "$SUMMARY"; FAILED=1
        return 1
    fi
    say "== $name (${limit}s): $*"
    STEP_LIMIT=$limit timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    say "-- $name: $status ($((SECONDS - start))s)"
    echo "| $name | $status | $((SECONDS - start)) |" >> "$SUMMARY"
    [ "$rc" = 0 ]
}

finish() {
    [ "$DRY_RUN" = 1 ] && say "DRY RUN finished (CPU, tiny sizes)"
    tee -a "$LOG" < "$SUMMARY"
    echo "results: $MMBERT_RESULTS (copy into benchmarks/RESULTS.md); every step's output: $LOG"
    exit $FAILED
}

# First: megatron-core (from the carried wheels), the extension, torch; then the backend choice.
# Every later step needs them, so a failure here ends the check with that one clear message.
if ! step imports "$PYTHON" -c "
import sys, torch, megatron.core, megatron_mmbert.data._index_builder
from importlib.metadata import version
print('python', sys.version.split()[0], '| torch', torch.__version__, '| megatron-core', version('megatron-core'),
      'from', megatron.core.__file__)
from megatron_mmbert.cpu_adapter import check_megatron_version; check_megatron_version()
from megatron_mmbert.model.backends import choose_backend, probe
m = probe(); print(m.describe())
for precision in ('fp32', 'bf16'):
    c = choose_backend('auto', precision, m, head_dim=64)
    print(precision, '->', c.describe()); [print('  note:', n) for n in c.notes]"; then
    say "megatron-core, the C++ extension or torch does not import: nothing else can run (see above)"
    finish
fi
# The runs start while time is left (--time-limit); the ones that would not fit are named as not run.
# shellcheck disable=SC2086
step model bash -c '"$0" benchmarks/model_throughput.py "$@" --time-limit $((STEP_LIMIT - 20)) --append' "$PYTHON" $MODEL
# The benchmark stops its run 15 s before the step's limit and reports the windows it finished.
# shellcheck disable=SC2086
step train bash -c '"$0" benchmarks/train_throughput.py "$@" --time-limit $((STEP_LIMIT - 15)) --log "$OUT/train_run.log" --append' "$PYTHON" $TRAIN
# shellcheck disable=SC2086
step parity "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_model_parity.py tests/test_rope_precision.py \
    tests/test_packed_attention.py -k "$PARITY_SELECT"
# shellcheck disable=SC2086
step attention "$PYTHON" benchmarks/attention_backends.py $ATTENTION --append
# shellcheck disable=SC2086
step host-syncs "$PYTHON" benchmarks/host_syncs.py $SYNCS --append
finish
