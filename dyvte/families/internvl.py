"""InternVL3 (HF-native ``InternVLForConditionalGeneration``, no remote code).

The processor cuts each image into 448-px tiles by the aspect ratio closest to the image's (plus
a thumbnail when there are several tiles); every tile goes through InternViT (pre-norm layers with
layer scale), a 0.5 pixel shuffle (2x2 neighbouring patches -> one token of 4x the width) and an
MLP projector: 256 visual tokens per tile, written as ``<IMG_CONTEXT>`` between the text tokens
``<img>`` and ``</img>``. The decoder is Qwen2 (q/k/v biases).
"""

from __future__ import annotations

import re

from dyvte.errors import UnsupportedModelError

from .base import Family
from .llava import VISION_ATTENTION, _eager_fp32_softmax, tower_flops


def _torch_modules():
    import torch

    class TileEncoder(torch.nn.Module):
        """InternViT + pixel shuffle + projector: tiles [N,3,H,W] -> features [N, V, D].

        Runs the HF submodules one by one (no position-embedding interpolation at the native
        size, no hidden-state hooks), so the traced graph is plain."""

        def __init__(self, tower, projector, feature_layer: int, strategy: str, ratio: float, side: int):
            super().__init__()
            self.tower, self.projector = tower, projector
            self.feature_layer, self.strategy = feature_layer, strategy
            self.side, self.k = side, int(round(1 / ratio))  # patch grid side; k x k patches -> one token

        def forward(self, pixel_values):
            emb = self.tower.embeddings
            x = emb.patch_embeddings(pixel_values.to(emb.patch_embeddings.projection.weight.dtype))  # [N,P,C]
            x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N,1+P,C]
            if emb.position_embeddings is not None:
                x = x + emb.position_embeddings
            for layer in self.tower.encoder.layer:
                x = layer(x)
            if self.feature_layer == -1:
                x = self.tower.layernorm(x)
            if self.strategy == "default":
                x = x[:, 1:]  # drop CLS
            s, k, C = self.side, self.k, x.shape[-1]
            # pixel shuffle as InternVL does it (on a [N, W, H, C] view of the patch grid)
            x = x.reshape(-1, s, s // k, C * k).permute(0, 2, 1, 3)  # [N, s/k, s, kC]
            x = x.reshape(-1, s // k, s // k, C * k * k).permute(0, 2, 1, 3)  # [N, s/k, s/k, k²C]
            return self.projector(x.reshape(-1, (s // k) ** 2, C * k * k))  # [N,V,D]

    return TileEncoder


def image_only_processor_class():
    """InternVLProcessor without its video processor, which needs torchvision (transformers 5
    refuses to build the processor without one). Images and text only, same outputs."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class InternVLImageProcessorOnly(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.image_token_id = tokenizer.context_image_token, tokenizer.context_image_token_id
            self.video_token = tokenizer.video_token
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return InternVLImageProcessorOnly


class InternVL(Family):
    name = "internvl"
    model_types = ("internvl",)
    hf_class = "InternVLForConditionalGeneration"
    presets = {"internvl3-1b": "OpenGVLab/InternVL3-1B-hf", "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
               "internvl3-8b": "OpenGVLab/InternVL3-8B-hf"}
    stock_processor = "InternVLProcessor"
    tile_unit = "tile"
    processor_settings = ("image_seq_length",)

    # -- checkpoint side ---------------------------------------------------------------------------
    def image_only_processor(self):
        return image_only_processor_class()

    def processor_defaults(self, config):
        return {"image_seq_length": int(config.image_seq_length)}

    def _feature_layer(self, config) -> tuple[int, int]:
        """(feature layer as configured, tower layers it needs)."""
        n = config.vision_config.num_hidden_layers
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError(f"vision_feature_layer {layer}: InternVL takes one layer")
        needed = n if layer == -1 else (layer if layer >= 0 else n + 1 + layer)
        if not 0 <= needed <= n:
            raise UnsupportedModelError(f"vision_feature_layer {layer} is out of range for {n} layers")
        return layer, needed

    def vision_encoder(self, config, dtype, device="cpu"):
        import copy

        import torch
        from transformers import AttentionInterface
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

        AttentionInterface.register(VISION_ATTENTION, _eager_fp32_softmax)
        layer, needed = self._feature_layer(config)
        vcfg = copy.deepcopy(config.vision_config)
        vcfg.num_hidden_layers = needed
        side = vcfg.image_size[0] // vcfg.patch_size[0]
        with torch.device(device):
            tower = InternVLVisionModel._from_config(vcfg, attn_implementation=VISION_ATTENTION)
            enc = _torch_modules()(tower, InternVLMultiModalProjector(config), layer,
                                   config.vision_feature_select_strategy, float(config.downsample_ratio), side)
        return enc.to(dtype).eval()

    def vision_from_hf(self, model, dtype):
        enc = self.vision_encoder(model.config, dtype)
        missing, _ = enc.tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
        if missing:
            raise UnsupportedModelError(f"vision tower weights missing after truncation: {missing[:3]}")
        enc.projector.load_state_dict(model.model.multi_modal_projector.state_dict())
        return enc.to(dtype).eval()

    def vision_meta(self, config, processor, module) -> dict:
        import torch

        size = config.vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (config.vision_config.num_channels, int(size[0]), int(size[1]))
        with torch.no_grad():
            tokens = int(module(torch.zeros(1, *shape)).shape[1])
        ip = processor.image_processor
        if getattr(processor, "image_seq_length", tokens) != tokens:
            raise UnsupportedModelError(f"the processor writes {processor.image_seq_length} tokens per tile, the model "
                                        f"makes {tokens}; fix image_seq_length in the checkpoint's processor config")
        most = int(getattr(ip, "max_patches", 12))
        per_image = most + (1 if most > 1 else 0)  # grid tiles + the thumbnail
        _, needed = self._feature_layer(config)
        return {"tile_shape": list(shape), "tokens_per_tile": tokens, "tiles_per_image": per_image,
                "vision_layers": needed, "downsample_ratio": float(config.downsample_ratio)}

    def hf_tile_features(self, model, tiles):
        """The HF model's own steps of ``get_image_features`` on tiles (tower, pixel shuffle, projector)."""
        m, cfg = model.model, model.config
        out = m.vision_tower(pixel_values=tiles, output_hidden_states=cfg.vision_feature_layer != -1, return_dict=True)
        feats = out.last_hidden_state if cfg.vision_feature_layer == -1 else out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        N, P, C = feats.shape
        s = int(round(P ** 0.5))
        feats = m.pixel_shuffle(feats.reshape(N, s, s, C), scale_factor=cfg.downsample_ratio)
        return m.multi_modal_projector(feats.reshape(N, -1, feats.shape[-1]))

    def hf_visual_features(self, model, inputs: dict):
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        return feats.reshape(-1, feats.shape[-1])

    def vision_flops(self, meta, vision_config, text_dim, tiles, grids=None):
        hw = tuple(meta["tile_shape"][1:])
        p = vision_config["patch_size"]
        p = p if isinstance(p, int) else p[0]
        v_cfg = {**vision_config, "patch_size": p}
        wide = vision_config["hidden_size"] * int(round(1 / meta["downsample_ratio"])) ** 2  # after pixel shuffle
        proj = 2 * int(meta["tokens_per_tile"]) * (wide * text_dim + text_dim * text_dim)
        return tiles * (tower_flops(v_cfg, meta["vision_layers"], hw) + proj)
