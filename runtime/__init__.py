"""Run engine folders: ``Pipeline.load(dir).generate(image, prompt)`` (``dyvte.runtime``)."""

from __future__ import annotations


def __getattr__(name):  # lazy: importing the package must not import torch
    if name in ("Pipeline", "Result"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Pipeline", "Result"]
