#!/usr/bin/env bash
# One GPU node: torchrun over all local GPUs.
#   bash examples/pretrain_single_node.sh examples/configs/mmbert_base.yaml [--key value ...]
# Rerun the same command to resume from RUN_DIR/checkpoints/latest. SIGTERM/SIGUSR1 save and exit 0
# (examples/launch_resumable.sh).
set -euo pipefail
CONFIG=${1:?usage: pretrain_single_node.sh CONFIG.yaml [--key value ...]}
shift
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
cd "$(dirname "$0")/.."
PY="$(bash install.sh --print-python)"  # the interpreter install.sh installed into
"$PY" pretrain_mmbert.py --config "$CONFIG" --validate --world-size "$NGPU" "$@"
PYTHON="$PY" TORCHRUN_ARGS="--standalone --nproc_per_node $NGPU" exec examples/launch_resumable.sh "$CONFIG" "$@"
