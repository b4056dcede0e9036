#!/usr/bin/env bash
# Create .venv (once) with tune-sana and its dev tools. On a machine without an NVIDIA GPU the
# CPU build of torch is installed first, so pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    .venv/bin/pip install -q torch==2.13.0 || \
      .venv/bin/pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  fi
fi
stamp=.venv/.tune-sana-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[dev,cluster]" 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import tune_sana, ray, diffusers, optuna, pyarrow" 
  touch "$stamp"
fi
