"""Backends behind the one :class:`~dyvte.runtime.backends.base.Runner` interface.

Backends register here by name; ``auto`` picks the fastest one available: TensorRT when the
folder has finished plans and TensorRT and a GPU are present, else torch on CUDA (or on the CPU
for bfloat16 folders), else ONNX Runtime.
"""

from __future__ import annotations

from dyvte.errors import BackendUnavailableError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def create_runner(name: str, manifest, **options):
    """Instantiate the runner ``name`` (or ``auto``) for an engine folder's manifest."""
    from dyvte import features

    if name == "auto":
        if features.has_tensorrt() and features.has_cuda() and "tensorrt" in features.built_engines(manifest):
            name = "tensorrt"
        elif features.has_cuda() or manifest.dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16
            name = "torch"
        else:
            name = "onnxruntime"
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(manifest, **options)
    if name == "torch":
        from .torch import TorchRunner

        return TorchRunner(manifest, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(manifest, **options)
    raise BackendUnavailableError(f"unknown backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")
