"""Next-token choice: greedy, or seeded temperature / top-p sampling, chosen per row.

Every sampled row draws from its own generator, so a request samples the same tokens in a
batch as it does alone.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from dyvte.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; ``seed`` None = a random seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def make_generator(params: SamplingParams, device="cpu"):
    """The row's own generator (None when greedy), seeded by ``params.seed`` or a random seed."""
    import torch

    if params.temperature <= 0:
        return None
    g = torch.Generator(device=device)  # never torch.seed(): it would reseed the caller's global RNG
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def sample(logits, rows: list):
    """Next token of every row: logits [n,V] float32, ``rows`` [(SamplingParams, generator)] ->
    token ids [n] int64. Greedy rows take the argmax; sampled rows draw from their own generator."""
    import torch

    tokens = logits.argmax(-1)
    for i, (p, g) in enumerate(rows):
        if g is None:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)  # [V]
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tokens[i] = torch.multinomial(probs, 1, generator=g)[0]
    return tokens
