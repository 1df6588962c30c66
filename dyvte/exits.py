"""The exit semantics on a Hugging Face VLM of any family, batched and differentiable (training side).

Used by gate training (labels: normal run vs exit run), VTW-style analyses and the demo model's
training. Sequences are right-padded, teacher-forced (prompt + answer). An exit at layer k
drops every visual position before layer k; the remaining tokens keep their position ids
(``[B,S,R]``: R = 3 M-RoPE rows for Qwen-VL, handed to HF as [3,B,S]).
The attention masks, rotary tables and DeepStack adds of each layer are the family's
(:meth:`dyvte.families.Family.hf_layer_inputs`, :meth:`~dyvte.families.Family.hf_after_layer`):
Gemma 3's image blocks and sliding windows and Qwen3-VL's DeepStack follow the tokens present.
The runtime implements the same semantics for deployment (runtime/dispatch.py); the tests check
both against an independent reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Seq:
    """A right-padded batch of token states. Shapes: hidden [B,S,D], the rest [B,S]."""

    hidden: torch.Tensor
    position_ids: torch.Tensor  # [B,S,R] (R rows per token)
    mask: torch.Tensor  # 1 = real token
    visual: torch.Tensor  # bool
    index: torch.Tensor  # original column of each token (to align labels after an exit)
    groups: torch.Tensor | None = None  # [B,S] image number 1, 2, ... of each visual token, 0 elsewhere
    deepstack: torch.Tensor | None = None  # [B,S,k,D] DeepStack features at the visual positions, 0 elsewhere


class ExitModel:
    """Wraps a (frozen or trainable) HF model of a supported family (:mod:`dyvte.families`)."""

    def __init__(self, model):
        from .families import family_for_config

        self.model = model
        self.family = family_for_config(model.config)
        self.lm = self.family.language_model(model)
        self.image_token_id = self.family.image_token_id(model.config)
        self.num_layers = len(self.lm.layers)

    def image_features(self, vision):
        """Visual-token features [n,D] of a batch's images in prompt order. ``vision``: the
        processor's tensors (dict, HF names) or, for LLaVA-1.5, pixel values [N,3,H,W]."""
        inputs = vision if isinstance(vision, dict) else {"pixel_values": vision}
        return self.family.hf_visual_features(self.model, inputs)

    def embed(self, input_ids, vision, attention_mask, image_features=None) -> Seq:
        visual = (input_ids == self.image_token_id) & attention_mask.bool()
        ids = input_ids.masked_fill(visual, 0)
        x = self.lm.embed_tokens(ids)
        deepstack = None
        if visual.any():
            feats = image_features if image_features is not None else self.image_features(vision)
            if isinstance(feats, dict):  # DeepStack families
                ds = feats["deepstack"]
                deepstack = x.new_zeros((*visual.shape, *ds.shape[1:]))
                deepstack[visual] = ds.to(x.dtype)
                feats = feats["features"]
            x = x.masked_scatter(visual[..., None], feats.reshape(-1, x.shape[-1]).to(x.dtype))
        inputs = vision if isinstance(vision, dict) or vision is None else {"pixel_values": vision}
        pos = self.family.hf_positions(self.model, input_ids, attention_mask, inputs)  # [B,S,R]
        idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        starts = visual & ~torch.cat([torch.zeros_like(visual[:, :1]), visual[:, :-1]], 1)  # each image's first token
        groups = starts.long().cumsum(1) * visual
        return Seq(x, pos, attention_mask, visual, idx, groups, deepstack)

    @staticmethod
    def hf_position_ids(position_ids):
        """[B,S,R] -> HF's layout: [B,S] for 1-D RoPE, [R,B,S] for M-RoPE."""
        return position_ids[..., 0] if position_ids.shape[-1] == 1 else position_ids.permute(2, 0, 1)

    def layers(self, s: Seq, start: int, end: int, collect=()) -> tuple[Seq, dict]:
        """Run decoder layers [start, end); ``collect``: layers whose input hidden state to keep."""
        pos = self.hf_position_ids(s.position_ids)
        groups = s.groups if s.groups is not None else torch.zeros_like(s.mask)
        per_layer = self.family.hf_layer_inputs(self.lm, s.hidden, pos, s.mask, groups)
        x, kept = s.hidden, {}
        for i in range(start, end):
            if i in collect:
                kept[i] = x
            bias, cos_sin = per_layer[i]
            x = self.lm.layers[i](x, attention_mask=bias, position_ids=pos, position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
            x = self.family.hf_after_layer(i, x, s.deepstack)
        return Seq(x, s.position_ids, s.mask, s.visual, s.index, s.groups, s.deepstack), kept

    def head(self, hidden):
        return self.family.lm_head(self.model)(self.lm.norm(hidden))

    @staticmethod
    def select(s: Seq, keep) -> Seq:
        """Keep the tokens where ``keep`` [B,S] (bool) and the mask are set, in order; rows are
        re-packed to the left (right padding). Kept tokens keep their position ids."""
        keep = s.mask.bool() & keep
        n = keep.sum(1)
        S = int(n.max())
        slot = keep.long().cumsum(1) - 1
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
        r, c = rows[keep], slot[keep]

        def move(t):
            out = t.new_zeros((keep.shape[0], S, *t.shape[2:]))
            out[r, c] = t[keep]
            return out

        mask = torch.zeros(keep.shape[0], S, dtype=s.mask.dtype, device=keep.device)
        mask[r, c] = 1
        return Seq(move(s.hidden), move(s.position_ids), mask, move(s.visual), move(s.index))

    @classmethod
    def drop_visual(cls, s: Seq) -> Seq:
        """Remove visual positions; rows are re-packed to the left (right padding)."""
        return cls.select(s, ~s.visual)

    def forward(self, input_ids, vision, attention_mask, exit_layer: int | None = None, image_features=None):
        """Logits [B,S',V] of a teacher-forced run exiting at ``exit_layer`` (None/L: no exit), the
        original column of each output position [B,S'] and the output mask [B,S']."""
        s = self.embed(input_ids, vision, attention_mask, image_features)
        k = self.num_layers if exit_layer is None else exit_layer
        s, _ = self.layers(s, 0, k)
        if k < self.num_layers:
            s, _ = self.layers(self.drop_visual(s), k, self.num_layers)
        return self.head(s.hidden), s.index, s.mask


def answer_loss(logits, index, mask, labels, reduction="mean"):
    """Cross-entropy of the answer tokens. logits [B,S,V] over positions ``index`` of ``labels``.

    Position j predicts the token at original column index[j] + 1.
    """
    B, S, V = logits.shape
    nxt = (index + 1).clamp(max=labels.shape[1] - 1)
    target = labels.gather(1, nxt).masked_fill(~mask.bool() | (index + 1 >= labels.shape[1]), -100)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), target.reshape(-1), reduction="none",
                                           ignore_index=-100).view(B, S)
    valid = target != -100
    if reduction == "none":
        return ce, valid, target
    return (ce * valid).sum() / valid.sum().clamp(min=1)
