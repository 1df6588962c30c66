"""Gemma 3 (``Gemma3ForConditionalGeneration``): fixed-size images of 256 visual tokens, a decoder
with sliding-window layers and bidirectional attention inside each image.

* **Vision**: every image (and, with pan-and-scan, every crop) is resized to the tower's square
  size and becomes ``mm_tokens_per_image`` tokens: the SigLIP tower (after its post-layernorm),
  average-pooled to a 16x16 grid, Gemma's RMSNorm and a projection (the ``vision`` graph,
  ``pixel_values`` [N,3,896,896] -> [N,256,D]). The prompt writes ``<start_of_image>``, the
  256 ``<image_soft_token>`` placeholders the features fill, ``<end_of_image>``; the delimiters
  are text and stay after an exit.
* **Decoder**: four RMSNorms per layer, each scaling by (1 + w) in float32, q/k RMSNorm, GELU-tanh
  MLP, embeddings times sqrt(d), logits scaled by ``query_pre_attn_scalar`` ** -0.5, tied
  embeddings (the head keeps its own copy). ``layer_types`` interleaves sliding-window layers (5
  of 6) with global ones, each kind with its own RoPE table (local base unscaled; global base with
  the checkpoint's scaling).
* **Masks**: a key is seen when it is not padding and comes earlier in the sequence, or belongs to
  the query's own image (the processor's ``token_type_ids`` mark an image's tokens; each contiguous
  run is one image); in sliding layers also ``q_pos - k_pos < sliding_window``. After an exit or
  pruning, the mask among the tokens present is this rule restricted to them: the window counts
  positions, and an image's remaining tokens still see each other both ways. Generated tokens are
  text: causal, windowed in sliding layers.
"""

from __future__ import annotations

from dyvte.errors import InputError, UnsupportedModelError

from .base import Family
from .llava import VISION_ATTENTION, _eager_fp32_softmax, tower_flops


def _encoder_class():
    import torch

    class SiglipProjector(torch.nn.Module):
        """SigLIP tower + Gemma 3's projector: pixel_values [N,3,H,W] -> features [N, tokens, D].

        Runs the HF submodules one by one: the patch convolution, the position embedding added as
        is (the tower's native size, no interpolation), the encoder layers, the post-layernorm,
        then the average pool, RMSNorm and projection of ``Gemma3MultiModalProjector``."""

        def __init__(self, tower, projector):
            super().__init__()
            self.tower, self.projector = tower, projector

        def forward(self, pixel_values):
            emb = self.tower.embeddings
            conv = emb.patch_embedding
            x = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)  # [N,P,E]
            x = x + emb.position_embedding.weight  # [P,E]: position ids 0..P-1
            for layer in self.tower.encoder.layers:
                x = layer(x, None)
            return self.projector(self.tower.post_layernorm(x))  # [N,tokens,D]

    return SiglipProjector


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    hf_class = "Gemma3ForConditionalGeneration"
    presets = {"gemma-3-4b": "google/gemma-3-4b-it", "gemma-3-12b": "google/gemma-3-12b-it",
               "gemma-3-27b": "google/gemma-3-27b-it"}
    text_models = ("gemma3_text",)
    processor_inputs = ("pixel_values", "token_type_ids")
    processor_settings = ("image_seq_length",)
    sliding_windows = True
    image_bidirectional = True

    # -- checkpoint side ---------------------------------------------------------------------------
    def check_config(self, config) -> None:
        super().check_config(config)
        text = config.text_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("use_bidirectional_attention (Gemma 3's embedding variant) is not a "
                                        "generative model; dyvte exports the causal Gemma 3")
        side = int(round(config.mm_tokens_per_image ** 0.5))
        patches = config.vision_config.image_size // config.vision_config.patch_size
        if side * side != config.mm_tokens_per_image or patches % side:
            raise UnsupportedModelError(f"mm_tokens_per_image {config.mm_tokens_per_image} does not pool the "
                                        f"{patches}x{patches} patch grid into a square")

    def processor_defaults(self, config) -> dict:
        return {"image_seq_length": int(config.mm_tokens_per_image)}

    def load_processor(self, path):
        """AutoProcessor (works without torchvision); an ``image_seq_length`` taken from config.json
        (folders without processor_config.json) also sets the expanded image sequence."""
        processor = super().load_processor(path)
        tok = processor.tokenizer
        n = int(processor.image_seq_length)
        if processor.full_image_sequence.count(tok.image_token) != n:
            processor.full_image_sequence = f"\n\n{tok.boi_token}{tok.image_token * n}{tok.eoi_token}\n\n"
        return processor

    def vision_encoder(self, config, dtype, device="cpu"):
        import copy

        import torch
        from transformers import AttentionInterface, AutoModel
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        AttentionInterface.register(VISION_ATTENTION, _eager_fp32_softmax)
        vcfg = copy.deepcopy(config.vision_config)
        vcfg.vision_use_head = False  # Gemma 3 reads the tower's hidden states, not its pooling head
        with torch.device(device):
            tower = AutoModel.from_config(vcfg, attn_implementation=VISION_ATTENTION)
            enc = _encoder_class()(tower, Gemma3MultiModalProjector(config))
        return enc.to(dtype).eval()

    def vision_from_hf(self, model, dtype):
        enc = self.vision_encoder(model.config, dtype)
        missing, _ = enc.tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
        if missing:
            raise UnsupportedModelError(f"vision tower weights missing: {missing[:3]}")
        enc.projector.load_state_dict(model.model.multi_modal_projector.state_dict())
        return enc.to(dtype).eval()

    def vision_meta(self, config, processor, module) -> dict:
        vc = config.vision_config
        size = dict(processor.image_processor.size)
        shape = [int(vc.num_channels), int(vc.image_size), int(vc.image_size)]
        if (size.get("height"), size.get("width")) != (vc.image_size, vc.image_size):
            raise UnsupportedModelError(f"the image processor resizes to {size}, the vision tower takes "
                                        f"{vc.image_size}x{vc.image_size}; fix size in the checkpoint's "
                                        "preprocessor config")
        tokens = int(config.mm_tokens_per_image)
        if int(processor.image_seq_length) != tokens:
            raise UnsupportedModelError(f"the processor writes {processor.image_seq_length} tokens per image, the "
                                        f"model makes {tokens}; fix image_seq_length in processor_config.json")
        ip = processor.image_processor
        crops = int(getattr(ip, "pan_and_scan_max_num_crops", None) or 4) if getattr(ip, "do_pan_and_scan", None) else 0
        return {"tile_shape": shape, "tokens_per_tile": tokens, "tiles_per_image": 1 + crops,
                "vision_layers": int(vc.num_hidden_layers)}

    def hf_tile_features(self, model, tiles):
        return model.model.get_image_features(pixel_values=tiles, return_dict=True).pooler_output

    def hf_visual_features(self, model, inputs: dict):
        feats = self.hf_tile_features(model, inputs["pixel_values"].to(model.dtype))
        return feats.reshape(-1, feats.shape[-1])

    def collate(self, inputs: list[dict]) -> dict:
        import torch

        return {"pixel_values": torch.cat([torch.as_tensor(x["pixel_values"]) for x in inputs])}

    def hf_layer_inputs(self, lm, hidden, position_ids, key_mask, groups):
        """Per layer (additive mask [B,1,S,S], cos/sin) of a right-padded batch: causal or the
        query's own image (``groups`` [B,S]), and in sliding layers q_pos - k_pos < sliding_window
        over the positions; each layer type with its own RoPE table."""
        import torch

        cfg = lm.config
        S = key_mask.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=key_mask.device).tril()
        pad = key_mask.bool()[:, None, :]
        same = (groups[:, :, None] == groups[:, None, :]) & (groups > 0)[:, :, None]
        allowed = (causal[None] | same) & pad
        window = position_ids[:, :, None] - position_ids[:, None, :] < cfg.sliding_window
        out = {}
        for kind in set(cfg.layer_types):
            ok = allowed & window if kind == "sliding_attention" else allowed
            bias = torch.zeros(ok.shape, dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill(~ok, torch.finfo(hidden.dtype).min)[:, None]
            out[kind] = (bias, lm.rotary_emb(hidden, position_ids, kind))
        return [out[kind] for kind in cfg.layer_types]

    def default_max_tiles(self, meta, max_input_len):
        return max(1, max_input_len // int(meta["tokens_per_tile"]))  # as many images as a prompt can hold

    def describe(self, meta):
        _, h, w = meta["tile_shape"]
        crops = " (pan-and-scan crops count as images)" if meta["tiles_per_image"] > 1 else ""
        return (f"images resized to {h}x{w} px, {meta['tokens_per_tile']} visual tokens each, up to "
                f"{meta['max_tiles']} per prompt{crops}")

    # -- run time ----------------------------------------------------------------------------------
    def split(self, meta, inputs, tokens):
        """Each prompt's pixel tiles (256 tokens each) and its row of ``token_type_ids``."""
        import numpy as np

        out = super().split(meta, inputs, tokens)
        types = None if inputs is None else inputs.get("token_type_ids")
        if types is not None:
            types = np.asarray(types).reshape(len(tokens), -1)
            out = [None if o is None else {**o, "token_type_ids": types[i]} for i, o in enumerate(out)]
        return out

    def prepare(self, meta, inputs, index=0):
        """Pixel tiles as for LLaVA; ``token_type_ids`` (optional, as the processor returns them)
        must mark exactly the image tokens."""
        import numpy as np

        vision = super().prepare(meta, inputs, index)
        types = None if inputs is None else inputs.get("token_type_ids")
        if vision is not None and types is not None:
            types = np.asarray(types)
            if set(np.unique(types).tolist()) - {0, 1} or int((types == 1).sum()) != vision.tokens:
                raise InputError(f"prompt {index}: token_type_ids marks {int((types == 1).sum())} image tokens but its "
                                 f"{len(vision.tiles)} image(s) make {vision.tokens}; pass the processor's "
                                 "token_type_ids with its input_ids")
        return vision

    def vision_flops(self, meta, vision_config, text_dim, tiles, grids=None):
        """Per image: SigLIP (patch embedding and every layer, no CLS token) and the projection
        2·tokens·E·D (the average pool and RMSNorm are not counted)."""
        hw = tuple(meta["tile_shape"][1:])
        proj = 2 * int(meta["tokens_per_tile"]) * vision_config["hidden_size"] * text_dim
        return tiles * (tower_flops(vision_config, meta["vision_layers"], hw, cls=False) + proj)
