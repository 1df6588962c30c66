"""Turn user inputs (image paths/PIL images, prompts) into model inputs, with clear errors."""

from __future__ import annotations

from pathlib import Path

from dyvte.errors import InputError


def load_image(image):
    """A path or PIL image -> RGB PIL image; missing or unreadable files give one-line errors."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"image {path} not found; pass the path of a PNG/JPEG file")
        try:
            with Image.open(path) as img:
                img.load()  # decode now: truncated files fail here, not later
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image {path}: {exc}; pass a valid PNG/JPEG file") from None
    raise InputError(f"image must be a file path or a PIL image, got {type(image).__name__}")


def format_prompt(processor, prompt: str) -> str:
    """Wrap a question in the model's chat template with one image, unless it already has one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty string")
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in prompt:
        return prompt  # already formatted by the caller
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: {image_token}\n{prompt} ASSISTANT:"  # LLaVA-1.5's format


def _outputs(out, images: bool):
    """Processor outputs -> (input_ids [T] int64, the vision tensors under their HF names or None)."""
    import numpy as np
    import torch

    ids = torch.from_numpy(np.asarray(out["input_ids"][0], dtype=np.int64))
    if not images:
        return ids, None
    vision = {}
    for k, v in out.items():
        if k in ("input_ids", "attention_mask") or v is None:
            continue
        if k == "token_type_ids" and not np.asarray(v).any():
            continue  # a text tokenizer's segment ids; Gemma 3's mark the image tokens (a vision input)
        arr = np.asarray(v)
        vision[k] = torch.from_numpy(arr.astype(np.float32) if arr.dtype.kind == "f" else arr.astype(np.int64))
    return ids, vision


def encode(processor, image, prompt: str):
    """(input_ids [T] int64, vision tensors {pixel_values, ...}) for one image + prompt; the
    vision tensors are what the processor returns besides the ids, under their HF names."""
    img = load_image(image)
    text = format_prompt(processor, prompt)
    n_images = text.count(getattr(processor, "image_token", "<image>"))
    if n_images != 1:
        raise InputError(f"the prompt holds {n_images} image placeholders; pass exactly one with one image")
    return _outputs(_process(processor, [img], text), True)


def encode_messages(processor, messages: list):
    """(input_ids [T] int64, vision tensors or None: see :func:`encode`) for a chat in the model's
    template. ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]``
    with parts ``{"type": "text", "text": str}`` or ``{"type": "image", "image": path | PIL image}``;
    images are used in order of appearance."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    images, chat = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"message {i} needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            chat.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, (list, tuple)) or not content:
            raise InputError(f"message {i} has no content; give a string or a list of text/image parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.append(load_image(part.get("image")))
                parts.append({"type": "image"})
            else:
                raise InputError(f"message {i} has a part of type {kind!r}; dyvte takes text and image parts")
        chat.append({"role": m["role"], "content": parts})
    if not getattr(processor, "chat_template", None):
        raise InputError("this engine folder's processor has no chat template; pass token ids to generate_ids instead")
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    return _outputs(_process(processor, images or None, text), bool(images))


def _process(processor, images, text: str):
    """The processor's outputs; what it refuses (e.g. an image of aspect ratio > 200 for Qwen-VL)
    is a one-line InputError."""
    try:
        return processor(images=images, text=[text], return_tensors="np")
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the model's processor cannot take this input ({msg}); resize or re-encode the image") from None
