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


def encode(processor, image, prompt: str):
    """(input_ids [T] int64, pixel_values [N,3,H,W] float32) for one image + prompt."""
    import numpy as np
    import torch

    img = load_image(image)
    text = format_prompt(processor, prompt)
    n_images = text.count(getattr(processor, "image_token", "<image>"))
    if n_images != 1:
        raise InputError(f"the prompt holds {n_images} image placeholders; pass exactly one with one image")
    out = processor(images=[img], text=[text], return_tensors="np")
    ids = torch.from_numpy(np.asarray(out["input_ids"][0], dtype=np.int64))
    pixels = torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.float32))
    return ids, pixels
