"""Next-token choice: greedy, or seeded temperature / top-p sampling."""

from __future__ import annotations

from dyvte.errors import InputError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, device="cpu"):
        import torch

        if temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits):
        """logits [B,V] float32 -> token ids [B] int64."""
        import torch

        if self.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]
