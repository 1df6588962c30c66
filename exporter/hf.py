"""Build dyvte's modules from a loaded Hugging Face LLaVA (weights copied by name)."""

from __future__ import annotations

import copy

import torch

from dyvte.errors import UnsupportedModelError

from .modules import DecoderSegment, Embed, Head, TextSpec, VisionEncoder, layer_state_from_hf

_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)


def text_model(model):
    """The HF text decoder (LlamaModel-like: embed_tokens, layers, norm, rotary_emb)."""
    return model.model.language_model


def text_spec(model) -> TextSpec:
    """Read the decoder's shape from the HF model, refusing what we do not re-implement."""
    cfg = model.config.text_config
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
    return TextSpec(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=model.lm_head.out_features,
        rms_norm_eps=float(layer.input_layernorm.variance_epsilon),
        hidden_act=cfg.hidden_act,
        rope_dim=2 * rope.inv_freq.numel(),
        attention_scaling=float(getattr(rope, "attention_scaling", 1.0)),
        qkv_bias=attn.q_proj.bias is not None,
        o_bias=attn.o_proj.bias is not None,
        mlp_bias=layer.mlp.gate_proj.bias is not None,
        max_position_embeddings=cfg.max_position_embeddings,
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
    head.lm_head.load_state_dict(model.lm_head.state_dict())
    return head.to(dtype).eval()


def vision_layout(config) -> tuple[list[int], int]:
    """Absolute hidden-state indices the features come from, and how many tower layers that needs."""
    n = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    absolute = [(i if i >= 0 else n + 1 + i) for i in layers]
    if any(not 0 <= i <= n for i in absolute):
        raise UnsupportedModelError(f"vision_feature_layer {config.vision_feature_layer} is out of range for {n} layers")
    return absolute, max(absolute)


VISION_ATTENTION = "dyvte_eager_fp32"


def _eager_fp32_softmax(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF eager attention with an explicit float32 softmax.

    HF's eager functions ask softmax for float32 through its ``dtype`` argument, which the
    TorchScript ONNX exporter drops; an explicit cast survives export, so fp16/bf16 vision
    graphs keep softmax in float32 like the decoder segments do.
    """
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights.float(), dim=-1).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def build_vision_encoder(config, dtype: torch.dtype, device="cpu") -> VisionEncoder:
    """An (untrained) vision encoder truncated to the layers the features need."""
    from transformers import AttentionInterface, AutoModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    AttentionInterface.register(VISION_ATTENTION, _eager_fp32_softmax)
    feature_layers, needed = vision_layout(config)
    vcfg = copy.deepcopy(config.vision_config)
    if needed < vcfg.num_hidden_layers:
        vcfg.num_hidden_layers = needed
        vcfg.tie_last_hidden_states = False  # layer `needed` is a raw layer output in the full tower
    with torch.device(device):
        tower = AutoModel.from_config(vcfg, attn_implementation=VISION_ATTENTION)
        projector = LlavaMultiModalProjector(config)
    enc = VisionEncoder(tower, projector, feature_layers, config.vision_feature_select_strategy)
    return enc.to(dtype).eval()


def vision_from_hf(model, dtype: torch.dtype) -> VisionEncoder:
    enc = build_vision_encoder(model.config, dtype)
    src = model.model.vision_tower.state_dict()
    missing, _ = enc.tower.load_state_dict(src, strict=False)
    if missing:
        raise UnsupportedModelError(f"vision tower weights missing after truncation: {missing[:3]}")
    enc.projector.load_state_dict(model.model.multi_modal_projector.state_dict())
    return enc.to(dtype).eval()


def image_shape(processor, config) -> tuple[int, int, int]:
    """(C, H, W) of pixel_values the processor produces."""
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None)
    if getattr(ip, "do_center_crop", False) and crop:
        return (config.vision_config.num_channels, int(crop["height"]), int(crop["width"]))
    size = config.vision_config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.vision_config.num_channels, int(size[0]), int(size[1]))
