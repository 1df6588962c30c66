"""Named models: ``--model llava-7b`` resolves to a Hugging Face repository id (presets are
declared by each model family, :mod:`dyvte.families`)."""


def resolve_preset(name: str) -> str:
    """Return the repository id of a preset, or ``name`` unchanged."""
    from .families import presets

    return presets().get(name, name)
