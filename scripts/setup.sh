#!/usr/bin/env bash
# Create .venv/ with dyvte (editable) and its pinned dependencies.
# torch is installed first and alone, pinned to the CPU-capable 2.13.0 wheel; set
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) to choose where it comes from.
# --triton also makes .venv/triton/: the environment Triton's python backend runs dyvte in
# (dyvte's pins with numpy 1.26, which the backend's stub needs; README "Serving") and the
# tritonserver of the nvidia-pytriton wheel, for tests/test_triton.py.
# --gpu: onnxruntime-gpu instead of onnxruntime (the two ship the same module and must not stay
# installed together; pip cannot swap a dependency from an extra, so both are removed and the GPU
# package reinstalled alone). --modelopt: also .venv/modelopt, NVIDIA ModelOpt's own environment for
# `dyvte build --quantize` (nvidia-modelopt[onnx] pins onnx/onnxruntime-gpu versions dyvte's conflict with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
torch_args=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_args=(--index-url "$TORCH_INDEX_URL")
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 "${torch_args[@]}"
.venv/bin/python -m pip install -q -e ".[test]"
for arg in "$@"; do
  case "$arg" in
    --gpu)
      .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
      .venv/bin/python -m pip install -q --no-deps onnxruntime-gpu==1.31.1
      .venv/bin/python -m pip install -q flatbuffers packaging protobuf ;;
    --modelopt)
      [ -x .venv/modelopt/bin/python ] || "$PY" -m venv .venv/modelopt
      .venv/modelopt/bin/python -m pip install -q --upgrade pip
      .venv/modelopt/bin/python -m pip install -q torch==2.13.0 "${torch_args[@]}"
      .venv/modelopt/bin/python -m pip install -q "nvidia-modelopt[onnx]==0.47.0" ;;
  esac
done
if [[ " $* " == *" --triton "* ]]; then
  [ -x .venv/triton/bin/python ] || "$PY" -m venv .venv/triton
  .venv/triton/bin/python -m pip install -q --upgrade pip
  .venv/triton/bin/python -m pip install -q torch==2.13.0 "${torch_args[@]}"
  mapfile -t reqs < <(.venv/bin/python -c "from dyvte.serving.triton import env_requirements; print(*env_requirements(), sep='\n')")
  .venv/triton/bin/python -m pip install -q "${reqs[@]}"
  .venv/triton/bin/python -m pip install -q --no-deps -e .
fi
