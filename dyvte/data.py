"""Question/answer samples -> padded, teacher-forced batches for a LLaVA processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass
class QA:
    image: object  # PIL image or path
    question: str
    answer: str
    qtype: str = "all"


def records_to_qa(records: list[dict], image_root: str | Path | None, limit: int | None = None) -> list[QA]:
    """Single-turn image samples of a LLaVA-format dataset (other records are skipped)."""
    root = Path(image_root) if image_root is not None else None
    out = []
    for r in records:
        conv = r.get("conversations") or []
        if "image" not in r or len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            continue
        img = Path(r["image"])
        if not img.is_absolute():
            if root is None:
                raise InputError("the dataset uses relative image paths; pass --image-root (the folder they are relative to)")
            img = root / img
        question = conv[0]["value"].replace("<image>", "").strip()
        out.append(QA(img, question, str(conv[1]["value"]).strip(), str(r.get("type", "all"))))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError("the dataset has no single-turn image samples (image + human/gpt conversation)")
    return out


def num_visual_tokens(processor) -> int:
    """Visual tokens one (square, crop-sized) image expands to, as the processor computes them."""
    import numpy as np
    from PIL import Image

    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {"height": 32, "width": 32}
    img = Image.fromarray(np.zeros((crop["height"], crop["width"], 3), np.uint8))
    out = processor(images=[img], text=[processor.image_token], return_tensors="np")
    return int((out["input_ids"][0] == processor.image_token_id).sum())


@dataclass
class TrainBatch:
    """Right-padded teacher-forced batch. Shapes [B,T]; ``vision``: the processor's tensors for
    the batch's images (HF names, the family's layout, e.g. pixel_values [B,3,H,W])."""

    input_ids: object
    attention_mask: object
    labels: object  # -100 except answer tokens (the targets of their previous position)
    vision: dict
    prompt_lengths: object  # [B] tokens before the answer
    qtypes: list

    @property
    def pixel_values(self):
        return self.vision["pixel_values"]


class Batcher:
    """Tokenizes (image, question, answer) with the model's chat template and processor (which
    expands each image into its visual tokens, however many the family makes of it)."""

    def __init__(self, processor, family):
        from .runtime.inputs import format_prompt

        self.processor, self.family = processor, family
        self.tok = processor.tokenizer
        self._format = format_prompt

    def _ids(self, text: str, image):
        from .runtime.inputs import _outputs

        return _outputs(self.processor(images=[image], text=[text], return_tensors="np"), True)

    def encode(self, question: str, answer: str, image) -> tuple[list[int], int, dict]:
        """(token ids of prompt + answer + end, prompt length, the image's processor tensors)."""
        proc, tok = self.processor, self.tok
        prompt = self._format(proc, question)
        p_ids, vision = self._ids(prompt, image)
        p_ids = p_ids.tolist()
        if getattr(proc, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            f_ids = self._ids(proc.apply_chat_template(msgs, add_generation_prompt=False), image)[0].tolist()
            if f_ids[: len(p_ids)] == p_ids and len(f_ids) > len(p_ids):
                return f_ids, len(p_ids), vision
        a_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return p_ids + a_ids + eos, len(p_ids), vision

    def __call__(self, samples: list[QA], device="cpu") -> TrainBatch:
        import torch

        from .runtime.inputs import load_image

        encoded = [self.encode(s.question, s.answer, load_image(s.image)) for s in samples]
        T = max(len(ids) for ids, _, _ in encoded)
        B = len(samples)
        ids = torch.full((B, T), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        for i, (seq, p, _) in enumerate(encoded):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, p: len(seq)] = torch.tensor(seq[p:])
        vision = {k: v.to(device) for k, v in self.family.collate([v for _, _, v in encoded]).items()}
        return TrainBatch(ids.to(device), mask.to(device), labels.to(device), vision,
                          torch.tensor([p for _, p, _ in encoded], device=device), [s.qtype for s in samples])
