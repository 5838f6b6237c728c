#!/usr/bin/env bash
# Everything worth checking on a lent GPU, in one call (the device tool's `run`), results under $OUT.
#
# The lent machines run Python 3.12 with torch 2.11, transformers, safetensors, tokenizers, pybind11,
# pyyaml, tensorboard and psutil, but no network and no megatron-core. Before the call, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.16.1 zstandard
# then run with carry [".whl"]:  bash benchmarks/gpu_check.sh
#
# What it runs (each step's output in $OUT/gpu_check.log, the RESULTS.md sections in $OUT/RESULTS.gpu.md):
#   1. HF parity of the model on the GPU (fp32, eval) at TP1/PP1 - the code path without the CPU adapter;
#   2. forward+backward tokens/s and MFU against HF ModernBertForMaskedLM, bf16, mmbert-small and
#      mmbert-base at 1024 tokens (benchmarks/model_throughput.py; goal >= 1.5x HF and 35% MFU);
#   3. training-step throughput and the share outside forward/backward (benchmarks/train_throughput.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "extension build failed"; tail -20 "$OUT/build.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check.log"
RESULTS_BEFORE=$(wc -l < benchmarks/RESULTS.md)

step() { echo "== $*" | tee -a "$OUT/gpu_check.log"; timeout 240 "$@" 2>&1 | grep -v -i "warn" | tail -25 | tee -a "$OUT/gpu_check.log"; }

step python3 -m pytest -q -x -p no:cacheprovider tests/test_model_parity.py -k "tp1_pp1 or loss_matches"
step python3 benchmarks/model_throughput.py --device cuda --precision bf16 --preset mmbert-small --rows 16 --seq-len 1024 --iters 10 --rounds 3 --append
step python3 benchmarks/model_throughput.py --device cuda --precision bf16 --preset mmbert-base --rows 16 --seq-len 1024 --iters 10 --rounds 3 --append
if [ -f benchmarks/train_throughput.py ]; then
    step python3 benchmarks/train_throughput.py --device cuda --append
fi
tail -n +"$((RESULTS_BEFORE + 1))" benchmarks/RESULTS.md > "$OUT/RESULTS.gpu.md"
echo "done; copy $OUT/RESULTS.gpu.md into benchmarks/RESULTS.md"
