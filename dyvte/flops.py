"""FLOPs of a DyVTE forward pass (multiply-adds counted as 2 FLOPs).

Decoder layer on n new tokens attending to c = n + cached keys (SwiGLU MLP of width m, H query
heads and Hkv key/value heads of size hd, model width d):

    projections  2·n·d·hd·(2H + 2Hkv)          (q, o: H heads; k, v: Hkv heads)
    attention    4·n·c·H·hd                     (QK^T and PV; the full square, as computed)
    MLP          6·n·d·m                        (gate, up, down)

With MHA (Hkv = H, H·hd = d) and no cache this is 2·n·(4d² + 3dm) + 4·n²·d. Each layer is
counted on the tokens present at it (the token plan, :func:`layer_tokens`): a prefill of n_full
tokens exiting at layer k costs layers [0, k) on n_full tokens and [k, L) on the
n_text = n_full - visual tokens; pruning stages lower the counts of the layers after them.
Choosing the pruned tokens (FastV's scores, DivPrune's distances) is not counted. The vision side (each family's formula over the tiles it encodes:
ViT patch embedding, layers up to the feature layer, projector; Qwen-VL per image, with full or
window attention per block and the patch merger) and the lm_head on the last token
are included; the gate adds 2·(2d·h + 2h) per evaluation. Norms, RoPE, softmax and residual adds
are ignored (< 1%), and so are the elementwise extras of Qwen3-VL and Gemma 3 (q/k norms, Gemma's
two more norms per layer and embedding scale, DeepStack adds). Gemma 3's sliding windows are not
subtracted: the segment graphs compute every query-key score and mask the ones outside the window,
so the attention costs what it costs in full layers (and a window of 1,024 tokens spans most
prompts: 256 tokens per image).
"""

from __future__ import annotations


def decoder_layer_flops(t: dict, n: int, context: int | None = None) -> float:
    d, h, hkv, hd, m = t["hidden_size"], t["num_heads"], t["num_kv_heads"], t["head_dim"], t["intermediate_size"]
    c = n if context is None else context
    return 2 * n * d * hd * (2 * h + 2 * hkv) + 4 * n * c * h * hd + 6 * n * d * m


def vision_flops(vision_config: dict, layers_used: int, text_dim: int, num_features: int = 1,
                 image_hw: tuple[int, int] | None = None) -> float:
    """One image through a CLIP-like ViT tower (patch conv + ``layers_used`` layers) and LLaVA's
    2-layer projector (the families compute their own: :meth:`dyvte.families.Family.vision_flops`)."""
    from dyvte.families.llava import Llava

    hw = image_hw or (vision_config["image_size"],) * 2
    meta = {"tile_shape": [vision_config.get("num_channels", 3), *hw], "vision_layers": layers_used,
            "feature_layers": [0] * num_features}
    return Llava().vision_flops(meta, vision_config, text_dim, 1)


def layer_tokens(segments, segment_tokens) -> list[int]:
    """Tokens present at each decoder layer from the tokens present in each segment
    (``segments``: [(start, end)] of the folder, ``segment_tokens``: ``Result.segment_tokens``)."""
    return [n for (a, b), n in zip(segments, segment_tokens) for _ in range(a, b)]


def exit_layer_tokens(num_layers: int, n_full: int, n_visual: int, exit_layer: int) -> list[int]:
    """Tokens present at each layer of a prompt of ``n_full`` tokens exiting at ``exit_layer``."""
    k = min(exit_layer, num_layers)
    return [n_full] * k + [n_full - n_visual] * (num_layers - k)


def plan_prefill_flops(t: dict, tokens: list[int], vision: float = 0.0, gate_evals: int = 0, gate_hidden: int = 0,
                       head: bool = True) -> float:
    """FLOPs of one prefill (first token) whose layer i sees ``tokens[i]`` tokens (any exit and
    pruning plan: :func:`layer_tokens`). The work of choosing the tokens (FastV's scores, DivPrune's
    distances) is not counted."""
    text = sum(decoder_layer_flops(t, n) for n in tokens)
    lm_head = 2 * t["hidden_size"] * t["vocab_size"] if head else 0
    gate = gate_evals * 2 * (2 * t["hidden_size"] * gate_hidden + 2 * gate_hidden)
    return vision + text + lm_head + gate


def plan_decode_flops(t: dict, tokens: list[int], new_tokens: int, head: bool = True) -> float:
    """FLOPs of generating ``new_tokens - 1`` tokens after the prefill: at step s, layer i's new
    token attends to the ``tokens[i]`` prompt tokens its cache holds plus s generated ones."""
    total = 0.0
    for step in range(1, new_tokens):
        total += sum(decoder_layer_flops(t, 1, n + step) for n in tokens)
        total += 2 * t["hidden_size"] * t["vocab_size"] if head else 0
    return total


def prefill_flops(t: dict, n_full: int, n_visual: int, exit_layer: int, vision: float = 0.0,
                  gate_evals: int = 0, gate_hidden: int = 0, head: bool = True) -> float:
    """FLOPs of one prefill (first token) exiting at ``exit_layer`` (L = no exit)."""
    tokens = exit_layer_tokens(t["num_layers"], n_full, n_visual, exit_layer)
    return plan_prefill_flops(t, tokens, vision, gate_evals, gate_hidden, head)


def decode_flops(t: dict, prompt_full: int, n_visual: int, exit_layer: int, new_tokens: int,
                 head: bool = True) -> float:
    """FLOPs of generating ``new_tokens - 1`` tokens after the prefill (one token each step)."""
    return plan_decode_flops(t, exit_layer_tokens(t["num_layers"], prompt_full, n_visual, exit_layer), new_tokens,
                             head)


def manifest_vision_flops(manifest, tiles: int = 1, grids=None) -> float:
    """Vision FLOPs of ``tiles`` tiles of an engine folder (its family's formula; ``grids``: the
    per-image sizes of families whose cost depends on them, ``Result.image_grids``)."""
    import json

    from dyvte.families import family_named

    cfg = json.loads(manifest.path(manifest.data["hf_config"]).read_text())
    m = manifest.model
    return family_named(m["family"]).vision_flops(m["vision"], cfg["vision_config"], manifest.text["hidden_size"], tiles,
                                                  grids)
