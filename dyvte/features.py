"""Optional features detected in one place (tests skip on these by name)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def has_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
    except Exception:  # stub wheels raise at import when the real libraries are absent
        return False
    return True


def tensorrt_version() -> str | None:
    if not has_tensorrt():
        return None
    import tensorrt

    return tensorrt.__version__


@functools.cache
def has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def built_engines(manifest) -> list[str]:
    """Which engine kinds a folder holds complete builds of besides ONNX (e.g. ``tensorrt``)."""
    return [k for k, v in manifest.data.get("engines", {}).items() if v.get("complete", True)]
