#!/usr/bin/env bash
# Create .venv and install korch into it. CPU-only machines get the CPU build of torch 2.13 first, so the
# `torch>=2.4` range in pyproject is already satisfied and pip never pulls a multi-GB CUDA build.
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "korch needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: torch comes with its CUDA build from the dependency range"
  else
    echo "[install] no GPU: installing the CPU build of torch 2.13.0"
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q -e "$spec"
echo "[install] korch installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
