#!/usr/bin/env bash
# Install megatron-mmbert and what it needs, into the current Python environment.
#
# On a machine without torch (a fresh CPU box, CI) this installs torch 2.13.0 first: an unpinned torch
# would pull a multi-GB CUDA build. On a GPU image that already has torch (NGC PyTorch, which also ships
# TransformerEngine, apex and flash-attn), torch is left alone. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[install] torch not found: installing torch==2.13.0 (CPU build)"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
# Build requirements of the C++ index builder (built in place, no build isolation, so pip does not
# fetch a second torch into an isolated build environment).
"$PYTHON" -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.12"
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test,datasets]"
"$PYTHON" -c "import megatron_mmbert.data._index_builder, megatron.core; print('[install] megatron-mmbert ready (megatron-core', megatron.core.__version__ + ')')"
