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

Gemma 3: each layer's mask is the contract's rule on the tokens present: causal in sequence order,
or inside one image (HF's ``get_block_sequence_ids_for_mask`` of the processor's
``token_type_ids``: each run of image tokens is one image), and in the config's sliding layers
q_pos - k_pos < sliding_window over the original positions; each layer type with its own HF rotary
table. Qwen3-VL: HF's DeepStack features (``get_image_features``) are added after layer i to the
visual tokens still present. (The cache-free recomputation stays equivalent: the masks never let a
key depend on a later token outside its own image block, and image blocks are whole or gone.)
"""

from __future__ import annotations

import torch


def _vision(vision):
    """The processor's image tensors as keyword arguments of ``get_image_features`` (a bare tensor
    is LLaVA-1.5's pixel_values; token-level tensors such as mm_token_type_ids are left out)."""
    kw = dict(vision) if isinstance(vision, dict) else {"pixel_values": vision}
    kw.pop("mm_token_type_ids", None)
    kw.pop("token_type_ids", None)
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
    tokens (default all: teacher-forced answer tokens after it are never visual) and those positions."""
    embeds, image, _ = _merged_inputs(model, input_ids, vision, prompt_len)
    return embeds, image


def _merged_inputs(model, input_ids, vision, prompt_len=None):
    """:func:`_merged_embeddings` and the DeepStack features at the image positions [1,T,k,D]
    (None without DeepStack)."""
    ids = input_ids.clone()
    image = ids == model.config.image_token_id
    if prompt_len is not None:
        image[:, prompt_len:] = False
    ids[image] = 0
    embeds = model.get_input_embeddings()(ids)
    deepstack = None
    if image.any():
        kw = _vision(vision)
        kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
        out = model.model.get_image_features(**kw, return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds[image] = feats.to(embeds.dtype)
        if getattr(out, "deepstack_features", None):
            layers = [torch.cat(list(f)) for f in out.deepstack_features]  # per layer [n,D]
            deepstack = embeds.new_zeros(*image.shape, len(layers), embeds.shape[-1])
            deepstack[image] = torch.stack(layers, 1).to(embeds.dtype)
    return embeds, image, deepstack


def _groups(model, input_ids, vision, image):
    """[1,T] image block of each token (-1: not an image token): Gemma 3's own grouping of its
    processor's token_type_ids; None for families without bidirectional image attention."""
    if model.config.model_type != "gemma3":
        return None
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    types = vision.get("token_type_ids") if isinstance(vision, dict) else None
    types = torch.as_tensor(types).reshape(1, -1) if types is not None else image.long()
    types = torch.cat([types, torch.zeros(1, input_ids.shape[1] - types.shape[1], dtype=types.dtype)], 1)
    return get_block_sequence_ids_for_mask(types)


def _layer_mask(config, layer, pos, groups, dtype):
    """Additive mask [1,1,S,S] of decoder layer ``layer`` among the tokens present (their original
    1-D positions ``pos`` [S], image blocks ``groups`` [S] or None)."""
    S = pos.shape[-1]
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    if groups is not None:
        allowed |= (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        allowed &= pos[:, None] - pos[None, :] < config.sliding_window
    return torch.zeros(1, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _layers(model, x, pos, vis, exit_layer, groups=None, deepstack=None):
    """The text decoder on one sequence x [1,S,D], visual positions dropped before ``exit_layer``;
    ``groups`` [1,S]: image blocks (Gemma 3), ``deepstack`` [1,S,k,D]: DeepStack features
    (Qwen3-VL). -> (last hidden states, the positions kept, the hidden states entering each layer)."""
    lm = model.model.language_model
    cfg = lm.config
    entering = []
    for i, layer in enumerate(lm.layers):
        if i == exit_layer:
            keep = ~vis[0]
            x, pos, vis = x[:, keep], pos[..., keep], vis[:, keep]
            groups = None if groups is None else groups[:, keep]
            deepstack = None if deepstack is None else deepstack[:, keep]
        entering.append(x)
        flat = pos.reshape(-1, pos.shape[-1])[0]  # 1-D positions (row t with M-RoPE)
        mask = _layer_mask(cfg, i, flat, None if groups is None else groups[0], x.dtype)
        if cfg.model_type == "gemma3_text":  # one rotary table per layer type
            cos_sin = lm.rotary_emb(x, pos, cfg.layer_types[i])
        else:
            cos_sin = lm.rotary_emb(x, pos)
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        x = x[0] if isinstance(x, tuple) else x
        if deepstack is not None and i < deepstack.shape[2] and vis.any():
            x = x.clone()
            x[vis] = x[vis] + deepstack[:, :, i][vis]
    return x, pos, entering


def forward_with_exit(model, embeds, positions, visual, exit_layer, return_hidden=False, groups=None, deepstack=None):
    """Run the text decoder on one sequence [1,S,D]; drop visual positions before ``exit_layer``
    (``groups``, ``deepstack``: see :func:`_layers`).

    Returns logits of the last position and (optionally) the hidden states entering each layer.
    """
    lm = model.model.language_model
    x, _, entering = _layers(model, embeds, positions, visual, exit_layer, groups, deepstack)
    logits = model.lm_head(lm.norm(x[:, -1:]))[0, -1]
    return (logits, entering) if return_hidden else logits


@torch.no_grad()
def generate_with_exit(model, input_ids, vision, exit_layer, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits with all visual tokens removed before ``exit_layer``
    (``vision``: the processor's image tensors; ``prompt_len``: see :func:`_merged_embeddings`)."""
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision, prompt_len)
    positions, first = _positions(model, input_ids, vision)
    groups = _groups(model, input_ids, vision, visual)
    return _generate(model, embeds, positions, first, visual, groups, deepstack, exit_layer, max_new_tokens, eos_ids)


def _generate(model, embeds, positions, first, visual, groups, deepstack, exit_layer, max_new_tokens, eos_ids):
    """The greedy loop of :func:`generate_with_exit` on a prepared prompt (generated tokens: text,
    at ``first`` + step in every position row)."""
    tokens, logits_out = [], []
    for step in range(max_new_tokens):
        logits = forward_with_exit(model, embeds, positions, visual, exit_layer, groups=groups, deepstack=deepstack)
        tok = int(logits.argmax())
        tokens.append(tok)
        logits_out.append(logits)
        if tok in eos_ids:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        positions = _append(positions, first + step)
        visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
        if groups is not None:  # generated tokens are text
            groups = torch.cat([groups, torch.full((1, 1), -1, dtype=groups.dtype)], 1)
        if deepstack is not None:
            deepstack = torch.cat([deepstack, deepstack.new_zeros(1, 1, *deepstack.shape[2:])], 1)
    return tokens, torch.stack(logits_out)


@torch.no_grad()
def gate_exit(model, gates, candidates, input_ids, vision, threshold=0.5):
    """Expected gate decision (paper Eq. 1 on HF hidden states): (exit layer, {layer: p_exit})."""
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision)
    L = model.config.text_config.num_hidden_layers
    _, entering = forward_with_exit(model, embeds, _positions(model, input_ids, vision)[0], visual, L,
                                    return_hidden=True, groups=_groups(model, input_ids, vision, visual),
                                    deepstack=deepstack)
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
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision)
    x, pos, _ = _layers(model, embeds, _positions(model, input_ids, vision)[0], visual, exit_layer,
                        _groups(model, input_ids, vision, visual), deepstack)
    return model.lm_head(lm.norm(x))[0], pos.reshape(-1, pos.shape[-1])[0]
