"""The embedded default model that ``dyvte-export`` uses without ``--model``.

``dyvte/assets/demo-llava`` is a small LLaVA (8 Llama layers, 36 visual tokens) trained on the
synthetic visual QA of :mod:`dyvte.synth` by ``scripts/train_demo_model.py``, with DyVTE gates
trained by ``dyvte train-gates`` (``gates.safetensors``); see the README for how and with what result.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "assets" / "demo-llava"
GATES_NAME = "gates.safetensors"


def default_model_dir() -> Path:
    """The shipped demo checkpoint folder."""
    if not (DEMO_DIR / "config.json").is_file():
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"the embedded demo model is missing from {DEMO_DIR} (incomplete install?); "
                                 "reinstall dyvte or pass --model")
    return DEMO_DIR


def default_gates() -> Path | None:
    """The demo model's trained gates (contract format), if shipped."""
    path = DEMO_DIR / GATES_NAME
    return path if path.is_file() else None
