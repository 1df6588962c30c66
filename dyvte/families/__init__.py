"""Model families dyvte exports, one adapter each (see :mod:`dyvte.families.base`)."""

from __future__ import annotations

import functools

from dyvte.errors import UnsupportedModelError

from .base import Family, Vision

__all__ = ["Family", "Vision", "families", "family_for_config", "family_named", "presets"]


@functools.cache
def families() -> dict[str, Family]:
    """Every registered family by name (a new family: one module, one line here)."""
    from .gemma3 import Gemma3
    from .internvl import InternVL
    from .llava import Llava
    from .llava_next import LlavaNext
    from .qwen3_vl import Qwen3VL
    from .qwen_vl import Qwen2VL, Qwen25VL

    return {f.name: f for f in (Llava(), LlavaNext(), InternVL(), Qwen2VL(), Qwen25VL(), Qwen3VL(), Gemma3())}


def family_named(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown model family '{name}'; known: {', '.join(families())}") from None


def family_for_config(config) -> Family:
    """The family of a Hugging Face config (by ``model_type``)."""
    for f in families().values():
        if config.model_type in f.model_types:
            f.check_config(config)
            return f
    classes = ", ".join(f"{f.hf_class} ('{t}')" for f in families().values() for t in f.model_types[:1])
    raise UnsupportedModelError(f"a '{config.model_type}' model is not supported; dyvte exports {classes} checkpoints")


def presets() -> dict[str, str]:
    """Preset name -> Hugging Face repo id, over all families."""
    return {k: v for f in families().values() for k, v in f.presets.items()}
