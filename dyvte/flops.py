"""FLOPs of a DyVTE forward pass (multiply-adds counted as 2 FLOPs).

Decoder layer on n new tokens attending to c = n + cached keys (SwiGLU MLP of width m, H query
heads and Hkv key/value heads of size hd, model width d):

    projections  2·n·d·hd·(2H + 2Hkv)          (q, o: H heads; k, v: Hkv heads)
    attention    4·n·c·H·hd                     (QK^T and PV; the full square, as computed)
    MLP          6·n·d·m                        (gate, up, down)

With MHA (Hkv = H, H·hd = d) and no cache this is 2·n·(4d² + 3dm) + 4·n²·d. A prefill of
n_full tokens exiting at layer k costs layers [0, k) on n_full tokens and [k, L) on the
n_text = n_full - visual tokens. Vision tower (ViT on P patches + CLS: patch embedding, layers up
to the feature layer, projector) and the lm_head on the last token are included; the gate adds
2·(2d·h + 2h) per evaluation. Norms, RoPE, softmax and residual adds are ignored (< 1%).
"""

from __future__ import annotations


def decoder_layer_flops(t: dict, n: int, context: int | None = None) -> float:
    d, h, hkv, hd, m = t["hidden_size"], t["num_heads"], t["num_kv_heads"], t["head_dim"], t["intermediate_size"]
    c = n if context is None else context
    return 2 * n * d * hd * (2 * h + 2 * hkv) + 4 * n * c * h * hd + 6 * n * d * m


def vision_flops(vision_config: dict, layers_used: int, text_dim: int, num_features: int = 1,
                 image_hw: tuple[int, int] | None = None) -> float:
    """One image through a ViT tower (patch conv + ``layers_used`` layers) and the 2-layer projector."""
    dv, mv, p = vision_config["hidden_size"], vision_config["intermediate_size"], vision_config["patch_size"]
    c = vision_config.get("num_channels", 3)
    hw = image_hw or (vision_config["image_size"],) * 2
    patches = (hw[0] // p) * (hw[1] // p)
    n = patches + 1  # CLS (SigLIP has none; the difference is < 0.5%)
    per_layer = 8 * n * dv * dv + 4 * n * n * dv + 4 * n * dv * mv
    proj = 2 * patches * (dv * num_features * text_dim + text_dim * text_dim)
    return 2 * patches * c * p * p * dv + layers_used * per_layer + proj


def prefill_flops(t: dict, n_full: int, n_visual: int, exit_layer: int, vision: float = 0.0,
                  gate_evals: int = 0, gate_hidden: int = 0, head: bool = True) -> float:
    """FLOPs of one prefill (first token) exiting at ``exit_layer`` (L = no exit)."""
    L = t["num_layers"]
    k = min(exit_layer, L)
    n_text = n_full - n_visual
    text = k * decoder_layer_flops(t, n_full) + (L - k) * decoder_layer_flops(t, n_text)
    lm_head = 2 * t["hidden_size"] * t["vocab_size"] if head else 0
    gate = gate_evals * 2 * (2 * t["hidden_size"] * gate_hidden + 2 * gate_hidden)
    return vision + text + lm_head + gate


def decode_flops(t: dict, prompt_full: int, n_visual: int, exit_layer: int, new_tokens: int,
                 head: bool = True) -> float:
    """FLOPs of generating ``new_tokens - 1`` tokens after the prefill (one token each step)."""
    L, k = t["num_layers"], min(exit_layer, t["num_layers"])
    total = 0.0
    for step in range(1, new_tokens):
        full_ctx, text_ctx = prompt_full + step, prompt_full - n_visual + step
        total += k * decoder_layer_flops(t, 1, full_ctx) + (L - k) * decoder_layer_flops(t, 1, text_ctx)
        total += 2 * t["hidden_size"] * t["vocab_size"] if head else 0
    return total


def manifest_vision_flops(manifest) -> float:
    """Vision FLOPs per image of an engine folder."""
    import json

    cfg = json.loads(manifest.path(manifest.data["hf_config"]).read_text())
    m = manifest.model
    feats = len(m.get("feature_layers", [0]))
    return vision_flops(cfg["vision_config"], m["vision_layers"], manifest.text["hidden_size"], feats,
                        tuple(m["image_shape"][1:]))
