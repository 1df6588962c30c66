"""An independent PyTorch implementation of the DyVTE exit semantics on the HF model.

Written directly on Hugging Face modules (no dyvte code; image features from the HF model's own
``get_image_features`` on the processor's tensors): greedy decoding without a KV cache,
recomputing the whole sequence each step. Layers < K see every token; before layer K the
visual positions are removed; the other tokens keep their position ids; generated tokens are
appended at the full-length positions. Recomputing without a cache is equivalent to the cache
semantics (layers < K cache visual keys, layers >= K do not) because attention is causal.

M-RoPE models (Qwen-VL): positions are HF's own ``get_rope_index`` rows [3,1,T]; an exit keeps
the remaining columns of all three rows; generated tokens continue at T + step + rope delta in
every row, as HF ``generate`` does.
"""

from __future__ import annotations

import torch


def _vision(vision):
    """The processor's image tensors as keyword arguments of ``get_image_features`` (a bare tensor
    is LLaVA-1.5's pixel_values; token-level tensors such as mm_token_type_ids are left out)."""
    kw = dict(vision) if isinstance(vision, dict) else {"pixel_values": vision}
    kw.pop("mm_token_type_ids", None)
    return kw


def _positions(model, input_ids, vision):
    """(position ids of the prompt: [1,T], or HF's M-RoPE rows [3,1,T]; the first generated
    token's position: T for 1-D RoPE, T + rope delta for M-RoPE)."""
    T = input_ids.shape[1]
    if not hasattr(model.model, "get_rope_index"):
        return torch.arange(T)[None], T
    image = (input_ids == model.config.image_token_id).int()
    grids = _vision(vision).get("image_grid_thw") if image.any() else None
    pos, delta = model.model.get_rope_index(input_ids, image, image_grid_thw=grids)
    return pos, T + int(delta)


def _append(positions, position: int):
    """Positions [..., S] -> [..., S+1] with ``position`` in every row."""
    return torch.cat([positions, torch.full((*positions.shape[:-1], 1), position)], -1)


def _merged_embeddings(model, input_ids, vision, prompt_len=None):
    """Embeddings with image features at the image-token positions of the first ``prompt_len``
    tokens (default all: teacher-forced answer tokens after it are never visual)."""
    ids = input_ids.clone()
    image = ids == model.config.image_token_id
    if prompt_len is not None:
        image[:, prompt_len:] = False
    ids[image] = 0
    embeds = model.get_input_embeddings()(ids)
    if image.any():
        kw = _vision(vision)
        kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
        feats = model.model.get_image_features(**kw, return_dict=True).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds[image] = feats.to(embeds.dtype)
    return embeds, image


def forward_with_exit(model, embeds, positions, visual, exit_layer, return_hidden=False):
    """Run the text decoder on one sequence [1,S,D]; drop visual positions before ``exit_layer``.

    Returns logits of the last position and (optionally) the hidden states entering each layer.
    """
    lm = model.model.language_model
    x, pos, vis = embeds, positions, visual
    entering = []
    for i, layer in enumerate(lm.layers):
        if i == exit_layer:
            keep = ~vis[0]
            x, pos, vis = x[:, keep], pos[..., keep], vis[:, keep]
        entering.append(x)
        S = x.shape[1]
        mask = torch.full((S, S), torch.finfo(x.dtype).min).triu(1)[None, None]
        cos_sin = lm.rotary_emb(x, pos)
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
    logits = model.lm_head(lm.norm(x[:, -1:]))[0, -1]
    return (logits, entering) if return_hidden else logits


@torch.no_grad()
def generate_with_exit(model, input_ids, vision, exit_layer, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits with all visual tokens removed before ``exit_layer``
    (``vision``: the processor's image tensors; ``prompt_len``: see :func:`_merged_embeddings`)."""
    embeds, visual = _merged_embeddings(model, input_ids, vision, prompt_len)
    positions, first = _positions(model, input_ids, vision)
    tokens, logits_out = [], []
    for step in range(max_new_tokens):
        logits = forward_with_exit(model, embeds, positions, visual, exit_layer)
        tok = int(logits.argmax())
        tokens.append(tok)
        logits_out.append(logits)
        if tok in eos_ids:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        positions = _append(positions, first + step)
        visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
    return tokens, torch.stack(logits_out)


@torch.no_grad()
def gate_exit(model, gates, candidates, input_ids, vision, threshold=0.5):
    """Expected gate decision (paper Eq. 1 on HF hidden states): (exit layer, {layer: p_exit})."""
    embeds, visual = _merged_embeddings(model, input_ids, vision)
    L = model.config.text_config.num_hidden_layers
    _, entering = forward_with_exit(model, embeds, _positions(model, input_ids, vision)[0], visual, L,
                                    return_hidden=True)
    last_visual = int(visual[0].nonzero().max())
    probs = {}
    for k in candidates:
        h = entering[k][0].double()  # input of layer k = output of layer k-1
        text = h[last_visual + 1:]
        mean = text[:-1].mean(0) if len(text) > 1 else text[-1]
        f = torch.cat([mean, text[-1]])
        w1, w2 = (w.double() for w in gates[k])
        p = torch.softmax(torch.nn.functional.gelu(f @ w1.T) @ w2.T, -1)
        probs[k] = float(p[1])
        if p[1] > threshold:
            return k, probs
    return L, probs


@torch.no_grad()
def teacher_forced(model, input_ids, vision, exit_layer):
    """All-position logits of one teacher-forced sequence [1,T] exiting at ``exit_layer``, and the
    original position of each output row (visual positions vanish after an exit)."""
    lm = model.model.language_model
    embeds, visual = _merged_embeddings(model, input_ids, vision)
    x, pos, vis = embeds, _positions(model, input_ids, vision)[0], visual
    for i, layer in enumerate(lm.layers):
        if i == exit_layer:
            keep = ~vis[0]
            x, pos, vis = x[:, keep], pos[..., keep], vis[:, keep]
        S = x.shape[1]
        mask = torch.full((S, S), torch.finfo(x.dtype).min).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        x = x[0] if isinstance(x, tuple) else x
    return model.lm_head(lm.norm(x))[0], pos.reshape(-1, pos.shape[-1])[0]
