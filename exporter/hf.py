"""Build dyvte's text-side modules from a loaded Hugging Face VLM (weights copied by name); the
vision side is the model family's (:mod:`dyvte.families`)."""

from __future__ import annotations

import torch

from dyvte.errors import UnsupportedModelError

from .modules import DecoderSegment, Embed, Head, TextSpec, layer_state_from_hf, linear_state_from_hf

_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)


def family_of(model):
    """The model family adapter of a loaded HF model."""
    from dyvte.families import family_for_config

    return family_for_config(model.config)


def text_model(model):
    """The HF text decoder (LlamaModel-like: embed_tokens, layers, norm, rotary_emb)."""
    return family_of(model).language_model(model)


def _norm_offset(norm) -> float:
    """0 for a Llama RMSNorm (scale w), 1 for Gemma's (scale 1 + w): what the norm gives with a zero weight."""
    import copy

    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        offset = float(probe(torch.ones(1, probe.weight.numel())).mean())
    if abs(offset) < 1e-3 or abs(offset - 1.0) < 1e-3:
        return float(round(offset))
    raise UnsupportedModelError(f"{type(norm).__name__} is neither Llama's RMSNorm (w * x) nor Gemma's ((1 + w) * x)")


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def rope_tables(lm, kind: str = "full"):
    """(inv_freq [hd/2], attention_scaling) of the layers of ``kind`` ("full" or "sliding"): Gemma 3
    keeps one table per layer type, other decoders one for all layers."""
    rope = lm.rotary_emb
    name = f"{kind}_attention"
    inv = getattr(rope, f"{name}_inv_freq", None)
    if inv is None:
        return rope.inv_freq, float(getattr(rope, "attention_scaling", 1.0))
    return inv, float(getattr(rope, f"{name}_attention_scaling", 1.0))


def text_spec(model) -> TextSpec:
    """Read the decoder's shape from the HF model, refusing what we do not re-implement."""
    family = family_of(model)
    cfg = family.text_config(model.config)
    lm = text_model(model)
    layer = lm.layers[0]
    names = {n for n, _ in layer.named_modules()}
    missing = [p for p in _LAYER_PARTS if p not in names]
    qk = [n for n in ("self_attn.q_norm", "self_attn.k_norm") if n in names]
    sandwich = [n for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm") if n in names]
    if missing or len(qk) == 1 or len(sandwich) == 1:
        raise UnsupportedModelError(
            f"decoder layer of '{cfg.model_type}' differs from the layouts dyvte re-implements "
            f"(missing {missing}, unexpected {qk if len(qk) == 1 else sandwich if len(sandwich) == 1 else []})"
        )
    rope = lm.rotary_emb
    rope_types = getattr(rope, "rope_type", "default")
    for rope_type in (rope_types.values() if isinstance(rope_types, dict) else [rope_types]):
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedModelError(
                f"RoPE type '{rope_type}' depends on the sequence length at run time; dyvte "
                "exports static RoPE (default, linear, llama3, yarn)"
            )
    layer_types, window = None, getattr(cfg, "sliding_window", None)
    if family.sliding_windows:
        types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        if set(types) - {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"layer types {sorted(set(types))}: dyvte exports full_attention and "
                                        "sliding_attention layers")
        if "sliding_attention" in types:
            layer_types = types
    elif window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise UnsupportedModelError(
            f"sliding-window attention (window {window}) is not exported; use a checkpoint "
            "without sliding_window or with sliding_window >= max_position_embeddings"
        )
    attn = layer.self_attn
    head_dim = attn.head_dim
    inv_freq, scaling = rope_tables(lm)
    mrope = family.mrope_section(model)
    if mrope is not None and sum(mrope) != inv_freq.numel():
        raise UnsupportedModelError(
            f"mrope_section {list(mrope)} sums to {sum(mrope)}, the rotary embedding has {inv_freq.numel()} "
            "frequencies (head_dim / 2); fix rope_parameters.mrope_section in the checkpoint's config"
        )
    scale = getattr(lm.embed_tokens, "embed_scale", None)  # Gemma's scaled embedding (a float32 buffer)
    offset = _norm_offset(layer.input_layernorm)
    return TextSpec(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=family.lm_head(model).out_features,
        rms_norm_eps=_eps(layer.input_layernorm),
        hidden_act=getattr(cfg, "hidden_activation", None) or cfg.hidden_act,
        rope_dim=2 * inv_freq.numel(),
        attention_scaling=scaling,
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=layer.mlp.gate_proj.bias is not None,
        max_position_embeddings=cfg.max_position_embeddings,
        mrope_section=mrope,
        mrope_interleaved=bool(mrope) and family.mrope_interleaved,
        qk_norm=bool(qk),
        norm_offset=offset,
        sandwich_norms=bool(sandwich),
        embed_scale=None if scale is None else float(scale),
        attn_scale=None if abs(float(attn.scaling) - head_dim ** -0.5) < 1e-12 else float(attn.scaling),
        layer_types=layer_types,
        sliding_window=int(window) if layer_types else None,
        sliding_rope_scaling=rope_tables(lm, "sliding")[1] if layer_types else 1.0,
        image_bidirectional=family.image_bidirectional,
        deepstack_layers=family.deepstack_layers(model.config),
    )


def _check_rope_dim(spec: TextSpec):
    if spec.rope_dim != spec.head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings (rotary dim {spec.rope_dim} of head dim {spec.head_dim}) "
            "are not exported"
        )


def segment_from_hf(model, spec: TextSpec, start: int, end: int, dtype: torch.dtype) -> DecoderSegment:
    _check_rope_dim(spec)
    lm = text_model(model)
    sliding = rope_tables(lm, "sliding")[0].detach() if spec.layer_types else None
    seg = DecoderSegment(spec, start, end, rope_tables(lm)[0].detach(), sliding)
    for i in range(start, end):
        seg.layers[str(i)].load_state_dict(layer_state_from_hf(lm.layers[i].state_dict()))
    return seg.to(dtype).eval()


def embed_from_hf(model, spec: TextSpec, dtype: torch.dtype) -> Embed:
    emb = Embed(spec)
    emb.embed_tokens.load_state_dict(text_model(model).embed_tokens.state_dict())
    return emb.to(dtype).eval()


def head_from_hf(model, spec: TextSpec, dtype: torch.dtype) -> Head:
    head = Head(spec)
    head.norm.load_state_dict(text_model(model).norm.state_dict())
    head.lm_head.load_state_dict(linear_state_from_hf(family_of(model).lm_head(model).state_dict()))
    return head.to(dtype).eval()
