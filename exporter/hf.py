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


def text_spec(model) -> TextSpec:
    """Read the decoder's shape from the HF model, refusing what we do not re-implement."""
    cfg = family_of(model).text_config(model.config)
    lm = text_model(model)
    layer = lm.layers[0]
    names = {n for n, _ in layer.named_modules()}
    missing = [p for p in _LAYER_PARTS if p not in names]
    extra = sorted(n for n in names if n.startswith("self_attn.") and n.split(".")[1] in ("q_norm", "k_norm"))
    if missing or extra:
        raise UnsupportedModelError(
            f"decoder layer of '{cfg.model_type}' differs from the Llama layout dyvte re-implements "
            f"(missing {missing}, unexpected {extra})"
        )
    rope = lm.rotary_emb
    if getattr(rope, "rope_type", "default") in ("dynamic", "longrope"):
        raise UnsupportedModelError(
            f"RoPE type '{rope.rope_type}' depends on the sequence length at run time; dyvte "
            "exports static RoPE (default, linear, llama3, yarn)"
        )
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise UnsupportedModelError(
            f"sliding-window attention (window {window}) is not exported; use a checkpoint "
            "without sliding_window or with sliding_window >= max_position_embeddings"
        )
    attn = layer.self_attn
    head_dim = attn.head_dim
    mrope = family_of(model).mrope_section(model)
    if mrope is not None and sum(mrope) != rope.inv_freq.numel():
        raise UnsupportedModelError(
            f"mrope_section {list(mrope)} sums to {sum(mrope)}, the rotary embedding has {rope.inv_freq.numel()} "
            "frequencies (head_dim / 2); fix rope_parameters.mrope_section in the checkpoint's config"
        )
    return TextSpec(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=family_of(model).lm_head(model).out_features,
        rms_norm_eps=float(layer.input_layernorm.variance_epsilon),
        hidden_act=cfg.hidden_act,
        rope_dim=2 * rope.inv_freq.numel(),
        attention_scaling=float(getattr(rope, "attention_scaling", 1.0)),
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=layer.mlp.gate_proj.bias is not None,
        max_position_embeddings=cfg.max_position_embeddings,
        mrope_section=mrope,
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
    seg = DecoderSegment(spec, start, end, lm.rotary_emb.inv_freq.detach())
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
