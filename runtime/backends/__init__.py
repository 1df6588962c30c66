"""Backends behind the one :class:`~dyvte.runtime.backends.base.Runner` interface.

Backends register here by name; ``auto`` picks the fastest one available: TensorRT when the
folder has finished plans and TensorRT and a GPU are present, else torch on CUDA (or on the CPU
for bfloat16 folders), else ONNX Runtime; quantized folders always run on ONNX Runtime.
"""

from __future__ import annotations

from dyvte.errors import BackendUnavailableError

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def _runner_class(name: str):
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner
    if name == "torch":
        from .torch import TorchRunner

        return TorchRunner
    if name == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner
    raise BackendUnavailableError(f"unknown backend '{name}'; choose one of auto, {', '.join(BACKENDS)}")


def create_runner(name: str, manifest, **options):
    """Instantiate the runner ``name`` (or ``auto``) for an engine folder's manifest.

    ``options`` go to the runner; with ``auto``, options the chosen backend does not take (e.g.
    ``device`` when ONNX Runtime on the CPU is chosen) are dropped, with an explicit backend they
    are a one-line error."""
    import inspect

    from dyvte import features
    from dyvte.errors import InputError

    chosen = name
    if name == "auto":
        if manifest.quantization:  # ONNX Runtime's quantized ops: only ONNX Runtime runs them
            chosen = "onnxruntime"
        elif features.has_tensorrt() and features.has_cuda() and "tensorrt" in features.built_engines(manifest):
            chosen = "tensorrt"
        elif features.has_cuda() or manifest.dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16
            chosen = "torch"
        else:
            chosen = "onnxruntime"
    cls = _runner_class(chosen)
    takes = set(inspect.signature(cls.__init__).parameters) - {"self", "manifest"}
    unknown = sorted(set(options) - takes)
    if unknown and name != "auto":
        raise InputError(f"backend {chosen} takes no option {', '.join(unknown)} (it takes {', '.join(sorted(takes))})")
    return cls(manifest, **{k: v for k, v in options.items() if k in takes})
