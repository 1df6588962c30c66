#!/usr/bin/env bash
# Create .venv/ with dyvte (editable) and its pinned dependencies.
# torch is installed first and alone, pinned to the CPU-capable 2.13.0 wheel; set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose where it comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/python -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test]"
