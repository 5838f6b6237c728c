#!/usr/bin/env bash
# torchrun for mmbert-pretrain that ends a preempted job with a checkpoint and exit 0.
#   TORCHRUN_ARGS="--standalone --nproc_per_node 8" examples/launch_resumable.sh CONFIG [--key value ...]
# CONFIG: a YAML file or a shipped config name (mmbert-pretrain --list-configs). Used by
# pretrain_single_node.sh; the Slurm scripts start one srun task per GPU instead (docs/training.md).
#
# Signals: SIGTERM at torchrun (the agent) or at the whole process group, and SIGUSR1 at this
# script, reach the trainers (torchrun forwards TERM/INT/HUP/QUIT and, with --signals_to_handle,
# USR1); they save at the end of the step and exit 0. torchrun then still exits 1 (its own
# SignalException), so this script exits 0 when a trainer reported "stopping cleanly" and the run's
# `latest` pointer was rewritten since the start (the trainer rewrites it only after a complete
# checkpoint), else torchrun's code. torchrun's output goes to the console and to a temporary log
# this script reads for that message (and removes).
# SHUTDOWN_TIMEOUT_S (default 900): how long torchrun waits for that save before SIGKILL.
set -uo pipefail
CONFIG=${1:?usage: TORCHRUN_ARGS=... launch_resumable.sh CONFIG [--key value ...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CKPT_DIR=$("$PY" -m megatron_mmbert.pretrain --config "$CONFIG" --print-checkpoint-dir "$@") || exit 2
START=$(date +%s)
STOP=""
LOG=$(mktemp -t mmbert-launch.XXXXXX) || exit 1
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of arguments
"$PY" -m torch.distributed.run --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown_timeout "${SHUTDOWN_TIMEOUT_S:-900}" ${TORCHRUN_ARGS:-} \
    -m megatron_mmbert.pretrain --config "$CONFIG" "$@" >>"$LOG" 2>&1 &
PID=$!
# The console copy ignores TERM (a group SIGTERM must not cut the save's messages) and ends with torchrun.
(trap '' TERM USR1; exec tail -n +1 -f --pid "$PID" "$LOG") &
TAIL=$!
trap 'STOP=USR1; kill -USR1 $PID 2>/dev/null' USR1
trap 'STOP=TERM' TERM  # torchrun got it too (process group); forwarding would make it two
while kill -0 $PID 2>/dev/null; do wait $PID; done  # a trapped signal interrupts `wait`
wait $PID
rc=$?
while kill -0 $TAIL 2>/dev/null; do wait $TAIL; done
STEP=$(grep -o "stopping cleanly at step [0-9]*" "$LOG" | tail -n 1 | grep -o "[0-9]*$")
rm -f "$LOG"
if [ "$rc" -ne 0 ] && [ -n "$STEP" ] && [ -f "$CKPT_DIR/latest" ] && [ "$(stat -c %Y "$CKPT_DIR/latest")" -ge "$START" ]; then
  echo "launch_resumable.sh: stopped cleanly${STOP:+ on SIG$STOP} at step $STEP after saving $CKPT_DIR/$(cat "$CKPT_DIR/latest"); rerun to resume"
  exit 0
fi
exit $rc
