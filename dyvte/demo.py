"""The embedded default model that ``dyvte-export`` uses without ``--model``."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_DIR = DATA_DIR / "demo-llava"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dyvte"


def default_model_dir() -> Path:
    """The shipped demo checkpoint; until one ships, a deterministic random tiny LLaVA."""
    if (DEMO_DIR / "config.json").is_file():
        return DEMO_DIR
    from .tiny import TinyLlavaSpec, build_tiny_llava

    target = _cache_dir() / "demo-random-v1"
    if not (target / "config.json").is_file():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        build_tiny_llava(TinyLlavaSpec(num_layers=8), tmp, seed=0)
        os.replace(tmp, target)
    return target
