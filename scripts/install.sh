#!/usr/bin/env bash
# Create .venv and install korch into it. CPU-only machines get the CPU build of torch 2.13 first, so the
# `torch>=2.4` range in pyproject is already satisfied and pip never pulls a multi-GB CUDA build.
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "korch needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip byte-compiles each file it installs, one after another on one core: 72 s of a 116 s first install on 2
# cores. Until the venv has been compiled once, pip skips that and compileall does it on every core (39 s). The
# .pyc files matter: where PYTHONDONTWRITEBYTECODE is set, nothing else writes them and every process pays
# ~10 s more for its imports. compileall's errors (Python 2 files some packages ship) are pip's to ignore too.
compiled=.venv/.korch-compiled
pip=(.venv/bin/python -m pip install -q)
[ -f "$compiled" ] || pip+=(--no-compile)
"${pip[@]}" --upgrade pip
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: torch comes with its CUDA build from the dependency range"
  else
    echo "[install] no GPU: installing the CPU build of torch 2.13.0"
    "${pip[@]}" torch==2.13.0
  fi
fi
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"${pip[@]}" -e "$spec"
if [ ! -f "$compiled" ]; then
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
  touch "$compiled"
fi
echo "[install] korch installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
