"""Find and load VLM checkpoints in Hugging Face format (local folders, the HF cache, presets).

Nothing is ever downloaded here: a model that is not on disk gives one line saying where we
looked and the command that downloads it. Weights are read from safetensors only and
``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import json
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


#: JSON files of a processor folder, parsed before loading so that a broken one is named.
PROCESSOR_JSON = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                  "chat_template.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them holds the vocabulary


def check_processor_files(path: Path) -> None:
    """Refuse a folder whose processor files are broken or missing: one line naming the file."""
    data = {}
    for name in PROCESSOR_JSON:
        file = path / name
        if file.is_file():
            try:
                data[name] = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelNotFoundError(f"{file} is not valid JSON ({exc}); restore it from the original "
                                         "checkpoint") from None
            if not isinstance(data[name], dict):
                raise ModelNotFoundError(f"{file} is not a JSON object; restore it from the original checkpoint")
    if "preprocessor_config.json" not in data and "image_processor" not in data.get("processor_config.json", {}):
        raise ModelNotFoundError(f"{path} has no preprocessor_config.json (the image processor's settings); copy it "
                                 "from the original checkpoint")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                                 "tokenizer files from the original checkpoint")
    if "chat_template.json" in data and not isinstance(data["chat_template.json"].get("chat_template"), str):
        raise ModelNotFoundError(f"{path / 'chat_template.json'} has no \"chat_template\" string; restore it from the "
                                 "original checkpoint")


def load_processor(path: Path, family=None):
    """Load the checkpoint's processor (tokenizer, image processor, chat template) as its model
    family does (default: the family of ``path/config.json``). The chat template may be in
    chat_template.jinja, chat_template.json or tokenizer_config.json; prompts need one."""
    quiet_transformers()
    path = Path(path)
    if family is None:
        from .families import family_for_config

        family = family_for_config(load_config(path))
    check_processor_files(path)
    try:
        processor = family.load_processor(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        lines = str(exc).strip().splitlines()
        reason = (lines[0][:200] + "..." * (len(lines[0]) > 200)) if lines else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot load the processor/tokenizer from {path}: {reason}; the folder needs the checkpoint's "
            "tokenizer files and preprocessor_config.json next to config.json"
        ) from None
    if not processor.chat_template:  # a template only in tokenizer_config.json is the tokenizer's
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if not processor.chat_template:
        raise ModelNotFoundError(
            f"{path} has no chat template (chat_template.jinja, chat_template.json or \"chat_template\" in "
            "tokenizer_config.json), which dyvte needs to format prompts; copy the model's template from the "
            "original checkpoint into chat_template.jinja"
        )
    return processor


def config_from_dict(data: dict):
    """A Hugging Face config from its ``config.json`` content (e.g. an engine folder's copy)."""
    quiet_transformers()
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot read the model config ({exc}); re-export the folder") from None
