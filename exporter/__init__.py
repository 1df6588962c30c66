"""HF LLaVA -> ONNX parts: vision, embeddings, decoder segments, gate, head (``dyvte.exporter``)."""

from __future__ import annotations


def __getattr__(name):  # lazy: importing the package must not import torch
    if name in ("export", "ExportSettings"):
        from . import export_model as _export

        return getattr(_export, name)
    raise AttributeError(name)


__all__ = ["export", "ExportSettings"]
