#!/usr/bin/env bash
# Install megatron-mmbert and what it needs.
#
#   bash install.sh                  install what is missing (a second run installs nothing)
#   bash install.sh --print-python   print the interpreter it installs into, change nothing
#
# Which Python (printed at the start; examples/quickstart.sh and run-tests ask --print-python):
#   1. $PYTHON, when set;
#   2. the active environment: $VIRTUAL_ENV, $CONDA_PREFIX, or the `python` / `python3` on the PATH
#      when it is a virtual environment or already has torch (an NGC PyTorch container);
#   3. otherwise this repository's .venv, created on first use with the first of python3.12,
#      python3.11, python3.10, python3 that is >= 3.10. A bare Debian/Ubuntu machine lands here: its
#      system Python refuses pip installs, and it may have no `python` at all.
#
# Without torch (a fresh CPU box, CI) torch 2.13.0 is installed first, pinned: an unpinned torch
# would pull a newer, multi-GB CUDA build. It comes from pip's configured index; set
# TORCH_INDEX_URL to PyTorch's CPU wheel index (see pytorch.org, "Get started") for the CPU-only
# build where the configured index serves the CUDA one. A GPU image that already has torch (NGC
# PyTorch, which also ships TransformerEngine, apex and flash-attn) keeps it.
set -euo pipefail
case ${PYTHON:-} in  # a relative path names a file from where we were called
    /*) ;;
    */*) PYTHON=$(cd "$(dirname "$PYTHON")" && echo "$PWD/$(basename "$PYTHON")") ;;
esac
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}

say() { echo "[install] $*"; }
die() { echo "[install] error: $*" >&2; exit 1; }

# "<kind> <version> <sys.executable>" of interpreter $1; kind is venv, torch (has torch) or plain.
# Nothing when $1 does not run.
probe() {
    "$1" - 2>/dev/null <<'EOF' || true
import importlib.util, sys
has_torch = importlib.util.find_spec("torch") is not None
kind = "venv" if sys.prefix != sys.base_prefix else "torch" if has_torch else "plain"
print(kind, "%d.%d.%d" % sys.version_info[:3], sys.executable)
EOF
}

# Sets PY (the interpreter) and WHY (the rule that chose it); creates nothing.
choose_python() {
    local name kind version exe
    if [ -n "${PYTHON:-}" ]; then
        PY=$PYTHON WHY='$PYTHON'
    elif [ -n "${VIRTUAL_ENV:-}" ]; then
        PY=$VIRTUAL_ENV/bin/python WHY="the active virtual environment"
    elif [ -n "${CONDA_PREFIX:-}" ]; then
        PY=$CONDA_PREFIX/bin/python WHY="the active conda environment"
    else
        PY=$VENV/bin/python WHY="this repository's .venv"
        for name in python python3; do
            command -v "$name" >/dev/null || continue
            read -r kind version exe <<<"$(probe "$name")"
            case ${kind:-} in
                venv) PY=$exe WHY="the virtual environment of \`$name\` on the PATH"; return ;;
                torch) PY=$exe WHY="\`$name\` on the PATH, which already has torch"; return ;;
            esac
        done
    fi
}

# Creates $VENV with the newest supported system Python.
create_venv() {
    local name base="" version
    for name in python3.12 python3.11 python3.10 python3; do
        if command -v "$name" >/dev/null \
                && "$name" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            base=$(command -v "$name")
            break
        fi
    done
    [ -n "$base" ] || die "no Python >= 3.10 found (tried python3.12, python3.11, python3.10, python3):" \
        "install one (Debian/Ubuntu: apt-get install python3 python3-venv)"
    version=$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    say "creating $VENV with $base (Python $version)"
    if ! "$base" -m venv "$VENV"; then
        rm -rf "$VENV"
        die "$base cannot create virtual environments (Debian/Ubuntu ship venv as a separate" \
            "package): run   apt-get install python$version-venv   (as root), then rerun"
    fi
}

# Exit 0 when the environment already holds this checkout (editable), every requirement it declares
# (with the test, datasets and plots extras), and nothing in setup.py, pyproject.toml or csrc/ changed
# since it was installed; else print what is missing. Runs outside the checkout, so `import
# megatron_mmbert` finds the installed package and not the current directory.
installed() {
    (cd / && "$PY" - "$ROOT" <<'EOF'
import glob, importlib.metadata as md, json, os, sys
from pathlib import Path

root = Path(sys.argv[1])
try:
    dist = md.distribution("megatron-mmbert")
except md.PackageNotFoundError:
    sys.exit("[install] megatron-mmbert is not installed in this environment")
url = json.loads(dist.read_text("direct_url.json") or "{}")
if url.get("url") != root.as_uri() or not url.get("dir_info", {}).get("editable"):
    sys.exit(f"[install] megatron-mmbert is installed from {url.get('url', '?')}, not editable from {root}")
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit("[install] packaging is missing")
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", "test", "datasets", "plots")):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(f"[install] {req.name} is missing")
    if not req.specifier.contains(have, prereleases=True):
        sys.exit(f"[install] {req.name} {have} does not satisfy {req}")
metadata = next((f.locate() for f in dist.files or [] if f.name == "METADATA"), None)
if metadata is None:
    sys.exit("[install] megatron-mmbert's install record is incomplete")
sources = [root / "setup.py", root / "pyproject.toml", *map(Path, glob.glob(str(root / "csrc" / "*")))]
changed = [s.name for s in sources if s.stat().st_mtime > os.path.getmtime(metadata)]
if changed:
    sys.exit(f"[install] changed since the last install: {', '.join(changed)}")
EOF
    )
}

choose_python
if [ "${1:-}" = --print-python ]; then
    echo "$PY"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument $1 (usage: bash install.sh [--print-python])"

if [ "$PY" = "$VENV/bin/python" ] && [ ! -e "$VENV" ]; then
    create_venv
fi
fix=""
if [ "$PY" = "$VENV/bin/python" ]; then
    fix=" (an interrupted or moved .venv: remove $VENV and rerun)"
fi
read -r _ version exe <<<"$(probe "$PY")"
[ -n "${exe:-}" ] || die "$PY ($WHY) does not run$fix"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PY ($WHY) is Python $version; megatron-mmbert needs >= 3.10"
say "Python $version: $exe ($WHY)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY ($WHY) has no pip$fix"

if installed; then
    say "already installed, nothing to do"
else
    if ! "$PY" -c "import torch" 2>/dev/null; then
        say "torch not found: installing torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
        if [ -n "$TORCH_INDEX_URL" ]; then  # torch from there, its dependencies from the configured index
            "$PY" -m pip install --quiet --no-deps --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" \
                || die "no torch==$TORCH_VERSION from TORCH_INDEX_URL=$TORCH_INDEX_URL"
        fi
        "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
    fi
    # Build requirements of the C++ index builder (built in place, no build isolation, so pip does
    # not fetch a second torch into an isolated build environment).
    "$PY" -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.12"
    "$PY" -m pip install --quiet --no-build-isolation -e ".[test,datasets,plots]"
fi
(cd / && "$PY" -W ignore::UserWarning -c "import megatron_mmbert.data._index_builder, megatron.core; print('[install] megatron-mmbert ready (megatron-core', megatron.core.__version__ + ')')")
if [ "$PY" = "$VENV/bin/python" ]; then
    say "commands run with $VENV/bin/python (or: source .venv/bin/activate)"
fi
