"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's images and positions, with a Qwen3
decoder and DeepStack. Images only: video inputs are refused.

What differs from Qwen2-VL / Qwen2.5-VL (:mod:`dyvte.families.qwen_vl`):

* **Vision tower**: 16-px patches (32 px per token after the 2x2 merge), full attention in every
  block (one image per call, so no mask), LayerNorm blocks with a GELU-tanh MLP, and a learned
  position embedding on a square grid, resampled bilinearly (align_corners) to each image's grid.
  The resampling is integer and weight work on the host: each patch's 4 taps into the table
  (``interp_index`` [P,4]) and their weights (``interp_weight`` [P,4], float32), fed to the graph
  next to ``rotary_pos``.
* **DeepStack**: the features after vision blocks ``deepstack_visual_indexes`` go through their own
  mergers; the decoder adds the i-th of them to the hidden states at the visual positions after
  layer i. The vision graph returns all of them with the main features in one tensor,
  ``image_features`` [tokens, 1 + n, D] (index 0: the features that fill the visual tokens);
  the runtime carries the other n token-aligned (``deepstack`` [B,S,n,D]) through exits and
  pruning into the segments holding layers < n: a token dropped before layer i receives no more.
* **Decoder**: Qwen3 (per-head q/k RMSNorm before RoPE, no q/k/v biases), *interleaved* M-RoPE:
  frequency slot j takes its angle from row h when j % 3 = 1 and j < 3·section[1], from row w when
  j % 3 = 2 and j < 3·section[2], else from row t. Positions are Qwen2-VL's (``get_rope_index``
  gives the same rows for still images).
"""

from __future__ import annotations

import functools

from dyvte.errors import UnsupportedModelError

from .qwen_vl import QwenVL, _torch_modules


@functools.lru_cache(maxsize=256)
def interpolation_taps(h: int, w: int, side: int, merge: int):
    """Bilinear (align_corners) resampling of a ``side`` x ``side`` position table to an h x w patch
    grid, for patches in the processor's merge-block order: (index [h*w, 4] int64 rows of the
    flattened table, weight [h*w, 4] float32), taps (r0 c0, r0 c1, r1 c0, r1 c1) as Hugging Face
    orders them, computed in float32 the same way."""
    import numpy as np

    from .qwen_vl import rotary_positions

    rc = rotary_positions(h, w, merge)  # [P,2] (row, col) of every patch
    taps, weights = [], []
    for coord, size in ((rc[:, 0], h), (rc[:, 1], w)):
        src = coord.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        raw = floor.astype(np.int64)[:, None] + np.arange(2)  # floor, floor + 1
        dist = np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32))
        taps.append(np.clip(raw, 0, side - 1))
        weights.append(np.clip(np.float32(1) - dist, 0, None).astype(np.float32))
    index = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, 4)
    weight = (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, 4)
    return index.astype(np.int64), weight.astype(np.float32)


def _encoder_class():
    import torch

    QwenVisionEncoder = _torch_modules()

    class Qwen3VisionEncoder(QwenVisionEncoder):
        """Qwen3-VL's vision tower, main merger and DeepStack mergers on ONE image, HF's own blocks:

        pixel_values [P, C*T*p*p], rotary_pos [P,2] int64, interp_index [P,4] int64, interp_weight
        [P,4] float32 -> image_features [P/4, 1 + n, D] (main features, then the n DeepStack ones).
        """

        def __init__(self, patch_embed, pos_embed, blocks, merger, deepstack_merger_list, deepstack_indexes, inv_freq):
            super().__init__(patch_embed, blocks, merger, range(len(blocks)), inv_freq, windowed=False)
            self.pos_embed, self.deepstack_merger_list = pos_embed, deepstack_merger_list
            self.deepstack_indexes = [int(i) for i in deepstack_indexes]

        def forward(self, pixel_values, rotary_pos, interp_index, interp_weight):
            proj = self.patch_embed.proj  # Conv3d [E,C,T,p,p] with bias, kernel = stride = one patch
            weight = proj.weight
            x = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t() + proj.bias  # [P,E]
            taps = self.pos_embed.weight[interp_index]  # [P,4,E]
            x = x + (taps * interp_weight[:, :, None].to(taps.dtype)).sum(1)
            cos, sin = self.rope(rotary_pos)
            stacked = []
            for i, blk in enumerate(self.blocks):
                x = x + self.attention(blk.attn, blk.norm1(x), cos, sin)
                x = x + blk.mlp(blk.norm2(x))
                if i in self.deepstack_indexes:
                    stacked.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))  # [P/4,D]
            return torch.stack([self.merger(x), *stacked], dim=1)  # [P/4,1+n,D]

    return Qwen3VisionEncoder


class Qwen3VL(QwenVL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    hf_class = "Qwen3VLForConditionalGeneration"
    presets = {"qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct", "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
               "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct"}
    stock_processor = "Qwen3VLProcessor"
    text_models = ("qwen3_vl_text",)
    mrope_interleaved = True

    # -- checkpoint side ---------------------------------------------------------------------------
    def deepstack_layers(self, config) -> int:
        return len(config.vision_config.deepstack_visual_indexes)

    def check_config(self, config) -> None:
        super().check_config(config)
        vc = config.vision_config
        side = int(round(vc.num_position_embeddings ** 0.5))
        if side * side != vc.num_position_embeddings:
            raise UnsupportedModelError(f"num_position_embeddings {vc.num_position_embeddings} is not a square grid")
        if vc.out_hidden_size != config.text_config.hidden_size:
            raise UnsupportedModelError(f"the vision tower's out_hidden_size {vc.out_hidden_size} differs from the "
                                        f"decoder's hidden_size {config.text_config.hidden_size}")

    def vision_encoder(self, config, dtype, device="cpu"):
        import torch
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        vcfg = config.vision_config
        with torch.device(device):
            tower = Qwen3VLVisionModel._from_config(vcfg)
            enc = _encoder_class()(tower.patch_embed, tower.pos_embed, tower.blocks, tower.merger,
                                   tower.deepstack_merger_list, vcfg.deepstack_visual_indexes,
                                   self.axial_inv_freq(vcfg).to(device))
        return enc.to(dtype).eval()

    def vision_meta(self, config, processor, module) -> dict:
        meta = super().vision_meta(config, processor, module)
        vc = config.vision_config
        return {**meta, "position_grid": int(round(vc.num_position_embeddings ** 0.5)),
                "deepstack_indexes": [int(i) for i in vc.deepstack_visual_indexes]}

    def hf_visual_features(self, model, inputs: dict):
        """{"features": [n,D], "deepstack": [n,k,D]} of the batch's images, in prompt order."""
        import torch

        out = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                             image_grid_thw=inputs["image_grid_thw"], return_dict=True)
        deepstack = torch.stack([torch.cat(list(per_image)) for per_image in out.deepstack_features], dim=1)
        return {"features": torch.cat(list(out.pooler_output)), "deepstack": deepstack}

    def hf_after_layer(self, index: int, hidden, deepstack):
        if deepstack is None or index >= deepstack.shape[2]:
            return hidden
        return hidden + deepstack[:, :, index].to(hidden.dtype)

    # -- the vision graph ----------------------------------------------------------------------------
    def image_feeds(self, meta: dict, grid, rows) -> dict:
        import torch

        feeds = super().image_feeds(meta, grid, rows)
        _, h, w = (int(x) for x in grid)
        index, weight = interpolation_taps(h, w, int(meta["position_grid"]), int(meta["merge_size"]))
        feeds.update(interp_index=torch.from_numpy(index), interp_weight=torch.from_numpy(weight))
        return feeds

    def vision_part(self, module, meta, dim, dtype):
        from dyvte.exporter.parts import TensorSpec

        part = super().vision_part(module, meta, dim, dtype)
        part.inputs += [TensorSpec("interp_index", ["patches", 4], "int64"),
                        TensorSpec("interp_weight", ["patches", 4], "float32")]
        n = len(meta["deepstack_indexes"])
        part.outputs = [TensorSpec("image_features", ["tokens", 1 + n, dim], dtype)]
        grid = self._example_grid(meta)
        feeds = self.image_feeds(meta, grid, part.example[0])
        part.example = tuple(feeds[t.name] for t in part.inputs)
        return part

    def vision_cases(self, model, part, meta, generator):
        """Images of several sizes, each against HF's tower, merger and DeepStack mergers."""
        import torch

        m = int(meta["merge_size"])
        seen = set()
        for side in (1, 2, None, 3):
            grid = self._example_grid(meta, side)
            if grid in seen:
                continue
            seen.add(grid)
            rows = torch.randn(grid[1] * grid[2], meta["tile_shape"][0], generator=generator)
            out = model.model.visual(rows, grid_thw=torch.tensor([grid]))
            ref = torch.stack([out.pooler_output, *out.deepstack_features], dim=1)
            yield f"{grid[1] // m}x{grid[2] // m} tokens", self.image_feeds(meta, grid, rows), ref

    def unpack(self, meta, outputs, visions, extras):
        """Per prompt {"features": [tokens,D], "deepstack": [tokens,n,D]} (images in prompt order)."""
        packed = super().unpack(meta, outputs, visions, extras)  # [tokens,1+n,D] each
        return [{"features": p[:, 0], "deepstack": p[:, 1:]} for p in packed]

    def vision_flops(self, meta, vision_config, text_dim, tiles, grids=None):
        """Per image of P patches (width E, MLP width M, n DeepStack mergers): patch embedding
        2·P·(C·T·p²)·E, position resampling 8·P·E, per block 8·P·E² + 4·P·E·M + 4·P²·E (full
        attention), the main and each DeepStack merger 2·(P/4)·4E·(4E + D)."""
        E, M, depth = int(meta["vision_width"]), int(meta["vision_mlp"]), int(meta["vision_layers"])
        m, n = int(meta["merge_size"]), len(meta["deepstack_indexes"])
        total = 0.0
        for t, h, w in (grids or []):
            P = t * h * w
            blocks = depth * (8 * P * E * E + 4 * P * E * M + 4 * P * P * E)
            mergers = (1 + n) * 2 * (P // (m * m)) * 4 * E * (4 * E + text_dim)
            total += 2 * P * meta["tile_shape"][0] * E + 8 * P * E + blocks + mergers
        return total

    def describe(self, meta):
        return super().describe(meta) + f", DeepStack from vision blocks {meta['deepstack_indexes']}"
