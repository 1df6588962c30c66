"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed-size image = one tile = V tokens."""

from __future__ import annotations

import copy

from dyvte.errors import UnsupportedModelError

from .base import Family


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
    import torch

    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights.float(), dim=-1).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def truncated_tower(config, needed: int):
    """The HF vision tower (CLIP/SigLIP/...) with only the layers the features need (eager fp32 softmax)."""
    from transformers import AttentionInterface, AutoModel

    AttentionInterface.register(VISION_ATTENTION, _eager_fp32_softmax)
    vcfg = copy.deepcopy(config.vision_config)
    if needed < vcfg.num_hidden_layers:
        vcfg.num_hidden_layers = needed
        vcfg.tie_last_hidden_states = False  # layer `needed` is a raw layer output in the full tower
    return AutoModel.from_config(vcfg, attn_implementation=VISION_ATTENTION)


def tower_flops(vision_config: dict, layers_used: int, tile_hw: tuple[int, int], cls: bool = True) -> float:
    """One tile through a ViT tower: patch embedding + ``layers_used`` layers."""
    dv, mv, p = vision_config["hidden_size"], vision_config["intermediate_size"], vision_config["patch_size"]
    p = p if isinstance(p, int) else p[0]
    c = vision_config.get("num_channels", 3)
    patches = (tile_hw[0] // p) * (tile_hw[1] // p)
    n = patches + (1 if cls else 0)
    per_layer = 8 * n * dv * dv + 4 * n * n * dv + 4 * n * dv * mv
    return 2 * patches * c * p * p * dv + layers_used * per_layer


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    presets = {"llava-7b": "llava-hf/llava-1.5-7b-hf", "llava-13b": "llava-hf/llava-1.5-13b-hf"}
    processor_settings = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")

    # -- checkpoint side ---------------------------------------------------------------------------
    def processor_defaults(self, config):
        """The tower's patch size and feature selection; one extra token for CLIP's CLS token."""
        vc = config.vision_config
        return dict(patch_size=int(vc.patch_size), vision_feature_select_strategy=config.vision_feature_select_strategy,
                    num_additional_image_tokens=int(vc.model_type == "clip_vision_model"))

    def projector(self, config):
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        return LlavaMultiModalProjector(config)

    def vision_encoder(self, config, dtype, device="cpu"):
        import torch

        from dyvte.exporter.modules import VisionEncoder

        feature_layers, needed = vision_layout(config)
        with torch.device(device):
            enc = VisionEncoder(truncated_tower(config, needed), self.projector(config), feature_layers,
                                config.vision_feature_select_strategy)
        return enc.to(dtype).eval()

    def hf_vision_modules(self, model):
        """(tower, projector) of the HF model."""
        return model.model.vision_tower, model.model.multi_modal_projector

    def vision_from_hf(self, model, dtype):
        enc = self.vision_encoder(model.config, dtype)
        tower, projector = self.hf_vision_modules(model)
        missing, _ = enc.tower.load_state_dict(tower.state_dict(), strict=False)
        if missing:
            raise UnsupportedModelError(f"vision tower weights missing after truncation: {missing[:3]}")
        enc.projector.load_state_dict(projector.state_dict())
        return enc.to(dtype).eval()

    def tile_shape(self, processor, config) -> tuple[int, int, int]:
        """(C, H, W) of the pixel tiles the processor produces."""
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None)
        if getattr(ip, "do_center_crop", False) and crop:
            return (config.vision_config.num_channels, int(crop["height"]), int(crop["width"]))
        size = config.vision_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (config.vision_config.num_channels, int(size[0]), int(size[1]))

    def vision_meta(self, config, processor, module) -> dict:
        import torch

        shape = self.tile_shape(processor, config)
        with torch.no_grad():
            tokens = int(module(torch.zeros(1, *shape)).shape[1])
        _, needed = vision_layout(config)
        return {"tile_shape": list(shape), "tokens_per_tile": tokens, "tiles_per_image": 1, "vision_layers": needed,
                "feature_layers": module.feature_layers, "feature_select": config.vision_feature_select_strategy}

    def hf_tile_features(self, model, tiles):
        import torch

        feats = model.model.get_image_features(pixel_values=tiles, return_dict=True).pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def hf_visual_features(self, model, inputs: dict):
        feats = self.hf_tile_features(model, inputs["pixel_values"].to(model.dtype))
        return feats.reshape(-1, feats.shape[-1])

    def default_max_tiles(self, meta, max_input_len):
        return max(1, max_input_len // int(meta["tokens_per_tile"]))  # as many images as a prompt can hold

    def vision_flops(self, meta, vision_config, text_dim, tiles, grids=None):
        feats = len(meta.get("feature_layers", [0]))
        hw = tuple(meta["tile_shape"][1:])
        p = vision_config["patch_size"]
        patches = (hw[0] // p) * (hw[1] // p)
        proj = 2 * patches * (vision_config["hidden_size"] * feats * text_dim + text_dim * text_dim)
        return tiles * (tower_flops(vision_config, meta["vision_layers"], hw) + proj)
