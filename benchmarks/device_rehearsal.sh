#!/usr/bin/env bash
# Rehearse the one GPU call on CPU, in the lent machine's environment as far as a CPU box can copy it:
#   * an interpreter without megatron-core, zstandard or the project installed (a venv of links to
#     this environment's other distributions: benchmarks/device_env.py "environment");
#   * the carried wheels (for this interpreter) in .whl/ of a copy of what a device call sends (the
#     tracked and untracked-not-ignored files), installed by gpu_check.sh itself with
#     `pip install --target /tmp/site` and reached through PYTHONPATH, as on the device;
#   * a bare environment (env -i: PATH=/usr/bin:/bin, a new HOME), pip kept off the network
#     (PIP_NO_INDEX, a dead proxy), the Hugging Face libraries offline, the C++ extension built
#     from scratch in the copy (a cold machine has none);
# then `bash benchmarks/gpu_check.sh --dry-run` there, and a check that it passes and leaves at most
# 8 files under $OUT (all that comes back from the device).
# What it cannot copy: Python 3.12 and torch 2.11 (it runs this interpreter and its torch), the GPU.
#
#   bash benchmarks/device_rehearsal.sh          # tests/test_gpu_check.py runs it (CI)
# Environment: PYTHON (the base interpreter; default: install.sh's), OUT (default: a temporary
# folder), REHEARSAL_WHEELS (where the wheels for this interpreter are kept between runs; default
# ~/.cache/megatron-mmbert/rehearsal-wheels). Exit 3: no wheel and no network (nothing rehearsed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${PYTHON:-$(bash install.sh --print-python)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmbert-rehearsal.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
WHEELS=${REHEARSAL_WHEELS:-${HOME:-$WORK}/.cache/megatron-mmbert/rehearsal-wheels}
say() { echo "[rehearsal] $*"; }

rc=0
"$BASE" benchmarks/device_env.py wheels --python-version local --dest "$WHEELS" || rc=$?
if [ "$rc" = 3 ]; then
    say "SKIPPED: no megatron-core wheel for this interpreter in $WHEELS and no network to download one"
    exit 3
elif [ "$rc" != 0 ]; then
    exit "$rc"
fi
"$BASE" benchmarks/device_env.py environment "$WORK/env"
"$BASE" benchmarks/device_env.py tree "$WORK/tree"
mkdir "$WORK/tree/.whl"
while IFS= read -r requirement; do   # only the carried ones (the folder may keep other wheels)
    name=$(echo "$requirement" | sed -E 's/[<>=!~ ;\[].*//; s/[-.]/_/g')
    cp "$WHEELS"/"$name"-*.whl "$WORK/tree/.whl/"
done < <("$BASE" benchmarks/device_env.py carried)
ENV_PY=$WORK/env/bin/python
if env -i PATH=/usr/bin:/bin "$ENV_PY" -c "import megatron" 2>/dev/null; then
    say "FAILED: megatron imports in the rehearsal environment before the wheels are installed"; exit 1
fi
say "megatron-core is not importable from $ENV_PY's site-packages, as on the device"

mkdir -p "$WORK/home"
status=0
env -i PATH=/usr/bin:/bin HOME="$WORK/home" LANG=C.UTF-8 TMPDIR="$WORK" OUT="$OUT" PYTHON="$ENV_PY" SITE_DIR="$WORK/site" \
    OMP_NUM_THREADS=1 PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null \
    http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    bash "$WORK/tree/benchmarks/gpu_check.sh" --dry-run || status=$?
files=$(find "$OUT" -type f | wc -l)
say "gpu_check.sh --dry-run exited $status; $files file(s) under $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
if [ "$files" -gt 8 ]; then
    say "FAILED: more than the 8 files the device sends back"; exit 1
fi
exit "$status"
