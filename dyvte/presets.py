"""Named models: ``--model llava-7b`` resolves to a Hugging Face repository id."""

PRESETS: dict[str, str] = {
    "llava-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-13b": "llava-hf/llava-1.5-13b-hf",
}


def resolve_preset(name: str) -> str:
    """Return the repository id of a preset, or ``name`` unchanged."""
    return PRESETS.get(name, name)
