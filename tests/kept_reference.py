"""The exit reference (tests/reference.py) on a prompt whose visual tokens are cut to a given subset
before layer 0: what a model family's masks, positions and DeepStack adds must give when only some
visual tokens are present (the tokens kept keep their positions, image blocks and DeepStack
features; the rest are gone from every layer). Written on the HF model with the reference's own
pieces, independently of dyvte's runtime."""

from __future__ import annotations

import torch

import reference as R


@torch.no_grad()
def generate_kept(model, input_ids, vision, kept, exit_layer, max_new_tokens, eos_ids=()):
    """Greedy tokens and logits with only the visual tokens ``kept`` (bool over the prompt's visual
    tokens, in order) present from layer 0, and every visual token gone before ``exit_layer``."""
    embeds, visual, deepstack = R._merged_inputs(model, input_ids, vision)
    positions, first = R._positions(model, input_ids, vision)
    groups = R._groups(model, input_ids, vision, visual)
    keep = torch.ones(visual.shape[1], dtype=torch.bool)
    keep[visual[0]] = kept
    embeds, positions, visual = embeds[:, keep], positions[..., keep], visual[:, keep]
    groups = None if groups is None else groups[:, keep]
    deepstack = None if deepstack is None else deepstack[:, keep]
    return R._generate(model, embeds, positions, first, visual, groups, deepstack, exit_layer, max_new_tokens, eos_ids)


def divprune_kept(model, input_ids, vision, share: float):
    """The visual tokens DivPrune keeps (the contract's definition on the decoder's input embeddings)."""
    from dyvte.runtime.plan import divprune_keep

    embeds, visual, _ = R._merged_inputs(model, input_ids, vision)
    return divprune_keep(embeds[visual].float(), share)
