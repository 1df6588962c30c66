"""Find and load VLM checkpoints in Hugging Face format (local folders, the HF cache, presets).

Nothing is ever downloaded here: a model that is not on disk gives one line saying where we
looked and the command that downloads it. Weights are read from safetensors only and
``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .errors import ModelNotFoundError
from .presets import resolve_preset

def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def locate_model(model: str | os.PathLike | None) -> Path:
    """Resolve ``model`` (folder, preset name or repo id) to a local checkpoint folder.

    ``None`` means the embedded default model shipped with the package.
    """
    if model is None:
        from .demo import default_model_dir

        return default_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json; pass a Hugging Face checkpoint folder "
                "(config.json, *.safetensors, tokenizer and processor files)"
            )
        return _check_weights(path)
    repo = resolve_preset(str(model))
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model '{model}' not found: no such folder, and it is neither a preset "
            f"({', '.join(_preset_names())}) nor a Hugging Face repo id (org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snap = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ModelNotFoundError(
            f"model '{model}' ({repo}) not found: no local folder of that name and no snapshot "
            f"in the Hugging Face cache {_hf_cache_dir()}; download it with "
            f"`hf download {repo}` (needs network) or pass --model /path/to/checkpoint"
        ) from None
    if not (snap / "config.json").is_file():
        raise ModelNotFoundError(
            f"the cached snapshot of {repo} at {snap} is incomplete (no config.json); "
            f"re-download it with `hf download {repo}`"
        )
    return _check_weights(snap)


def _preset_names() -> list[str]:
    from .families import presets

    return sorted(presets())


def _check_weights(path: Path) -> Path:
    if any(path.glob("*.safetensors")):
        return path
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelNotFoundError(
            f"{path} holds only pickled weights (*.bin/*.pt), which dyvte never loads; convert "
            "them to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` "
            "in a trusted environment) and retry"
        )
    raise ModelNotFoundError(
        f"{path} has no *.safetensors weights; download the full checkpoint (e.g. "
        "`hf download llava-hf/llava-1.5-7b-hf`) or point --model at a complete folder"
    )


def quiet_transformers():
    """Silence transformers' info/warning chatter (torchvision fallbacks, progress bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def load_config(path: Path):
    """Read the checkpoint's config and check that a family adapter exports it."""
    quiet_transformers()
    from transformers import AutoConfig

    from .families import family_for_config

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {exc}") from None
    family_for_config(config)
    return config


def load_model(path: Path, dtype: str = "float32"):
    """Load a checkpoint (safetensors only) with eager attention, in eval mode."""
    import torch

    from .families import family_for_config

    quiet_transformers()
    family = family_for_config(load_config(path))
    try:
        model = family.model_class().from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the weights in {path}: {exc}") from None
    return model.eval()


def load_processor(path: Path, family=None):
    """Load the checkpoint's processor (tokenizer, image processor, chat template) as its model
    family does (default: the family of ``path/config.json``)."""
    quiet_transformers()
    if family is None:
        from .families import family_for_config

        family = family_for_config(load_config(path))
    try:
        return family.load_processor(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelNotFoundError(
            f"cannot load the processor/tokenizer from {path}: {exc}; the folder needs "
            "tokenizer and preprocessor files next to config.json"
        ) from None


def config_from_dict(data: dict):
    """A Hugging Face config from its ``config.json`` content (e.g. an engine folder's copy)."""
    quiet_transformers()
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read the model config ({exc}); re-export the folder") from None
