#!/usr/bin/env bash
# torchrun for pretrain_mmbert.py that ends a preempted job with a checkpoint and exit 0.
#   TORCHRUN_ARGS="--standalone --nproc_per_node 8" examples/launch_resumable.sh CONFIG.yaml [--key value ...]
# Used by pretrain_single_node.sh and slurm/pretrain_multinode.sbatch (one per node under srun).
#
# Signals: SIGUSR1 (Slurm's --signal=B:USR1, forwarded by srun) is passed on to torchrun, which
# forwards it to the trainers (--signals_to_handle includes SIGUSR1); SIGTERM reaches torchrun
# and the trainers directly (Slurm and `kill -- -PGID` signal the whole process group). Trainers
# save at the end of the step and exit 0; torchrun then still exits 1 (its own SignalException),
# so this script exits 0 when it saw a signal and the run's `latest` pointer was rewritten since
# the start (the trainer rewrites it only after a complete checkpoint), else torchrun's code.
# SHUTDOWN_TIMEOUT_S (default 900): how long torchrun waits for that save before SIGKILL.
set -uo pipefail
CONFIG=${1:?usage: TORCHRUN_ARGS=... launch_resumable.sh CONFIG.yaml [--key value ...]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CKPT_DIR=$("$PY" pretrain_mmbert.py --config "$CONFIG" --print-checkpoint-dir "$@") || exit 2
START=$(date +%s)
STOP=""
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of arguments
"$PY" -m torch.distributed.run --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown_timeout "${SHUTDOWN_TIMEOUT_S:-900}" ${TORCHRUN_ARGS:-} \
    pretrain_mmbert.py --config "$CONFIG" "$@" &
PID=$!
trap 'STOP=USR1; kill -USR1 $PID 2>/dev/null' USR1
trap 'STOP=TERM' TERM  # torchrun got it too (process group); forwarding would make it two
while kill -0 $PID 2>/dev/null; do wait $PID; done  # a trapped signal interrupts `wait`
wait $PID
rc=$?
if [ -n "$STOP" ] && [ -f "$CKPT_DIR/latest" ] && [ "$(stat -c %Y "$CKPT_DIR/latest")" -ge "$START" ]; then
  echo "launch_resumable.sh: stopped on SIG$STOP after saving $CKPT_DIR/$(cat "$CKPT_DIR/latest"); rerun to resume"
  exit 0
fi
exit $rc
