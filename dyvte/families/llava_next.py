"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): "anyres" images.

Each image becomes a base tile (the whole image at the tile size) plus a grid of tiles chosen
from ``image_grid_pinpoints`` for its size; every tile goes through the CLIP tower and projector
(the ``vision`` graph, V = (tile/patch)² features each). At run time the grid tiles' features
are laid out as one feature canvas, the rows/columns that only cover the padding of the
resized image are removed ("unpadding"), ``image_newline`` is appended after every row and the
base tile's features are put first: V + rows·(cols+1) visual tokens, which depends on the size.
"""

from __future__ import annotations

from dyvte.errors import InputError

from .base import Vision
from .llava import Llava


def best_resolution(size_hw, pinpoints) -> tuple[int, int]:
    """The (H, W) of ``pinpoints`` an image of ``size_hw`` is resized into: the most effective
    pixels after an aspect-preserving fit, then the least wasted area (as LLaVA-NeXT chooses)."""
    oh, ow = (int(x) for x in size_hw)
    best, best_eff, best_waste = None, -1, None
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def kept_window(size_hw, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1): the part of a rows x cols feature canvas that shows the image, not the
    padding added around it when it was fitted into the canvas (centred, floor division)."""
    oh, ow = (int(x) for x in size_hw)
    if ow / oh > cols / rows:  # wider than the canvas: padding above and below
        pad = (rows - int(round(oh * (cols / ow), 7))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(round(ow * (rows / oh), 7))) // 2
    return 0, rows, pad, cols - pad


class LlavaNext(Llava):
    name = "llava_next"
    model_types = ("llava_next",)
    hf_class = "LlavaNextForConditionalGeneration"
    presets = {"llava-next-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
               "llava-next-13b": "llava-hf/llava-v1.6-vicuna-13b-hf"}
    processor_inputs = ("pixel_values", "image_sizes")
    vision_paths = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline")

    # -- checkpoint side ---------------------------------------------------------------------------
    def projector(self, config):
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        return LlavaNextMultiModalProjector(config)

    def vision_meta(self, config, processor, module) -> dict:
        meta = super().vision_meta(config, processor, module)
        tile = meta["tile_shape"][1]
        pins = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
        if any(h % tile or w % tile for h, w in pins):
            from dyvte.errors import UnsupportedModelError

            raise UnsupportedModelError(f"image_grid_pinpoints {pins} are not multiples of the tile size {tile}")
        side = int(round(meta["tokens_per_tile"] ** 0.5))
        per_image = 1 + max(h // tile * (w // tile) for h, w in pins)
        return {**meta, "grid_pinpoints": pins, "feature_side": side, "tiles_per_image": per_image}

    def default_max_tiles(self, meta, max_input_len):
        return int(meta["tiles_per_image"])

    def vision_extras(self, model) -> dict:
        return {"image_newline": model.model.image_newline}

    def hf_tile_features(self, model, tiles):
        """Tower + projector of the HF model on tiles (what ``get_image_features`` does per tile)."""
        import torch

        cfg = model.config
        out = model.model.vision_tower(tiles, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        feats = (out.hidden_states[layers] if isinstance(layers, int)
                 else torch.cat([out.hidden_states[i] for i in layers], dim=-1))
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return model.model.multi_modal_projector(feats)

    def hf_visual_features(self, model, inputs: dict):
        import torch

        out = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                             image_sizes=inputs["image_sizes"], return_dict=True)
        return torch.cat(list(out.pooler_output))

    def collate(self, inputs: list[dict]) -> dict:
        import torch

        tiles = max(x["pixel_values"].shape[1] for x in inputs)
        px = [torch.nn.functional.pad(x["pixel_values"], (0, 0, 0, 0, 0, 0, 0, tiles - x["pixel_values"].shape[1]))
              for x in inputs]
        return {"pixel_values": torch.cat(px), "image_sizes": torch.cat([torch.as_tensor(x["image_sizes"]) for x in inputs])}

    # -- run time ----------------------------------------------------------------------------------
    def _layout(self, meta: dict, size_hw) -> tuple[int, int, tuple[int, int, int, int]]:
        """(grid rows, grid cols, kept window of the feature canvas) of an image of ``size_hw``."""
        tile, side = meta["tile_shape"][1], meta["feature_side"]
        bh, bw = best_resolution(size_hw, meta["grid_pinpoints"])
        th, tw = bh // tile, bw // tile
        return th, tw, kept_window(size_hw, th * side, tw * side)

    def image_tokens(self, meta: dict, size_hw) -> int:
        """Visual tokens of one image of ``size_hw`` (H, W)."""
        _, _, (r0, r1, c0, c1) = self._layout(meta, size_hw)
        return int(meta["tokens_per_tile"]) + (r1 - r0) * (c1 - c0 + 1)

    def _sizes(self, inputs: dict | None, index: int, n: int):
        import numpy as np

        sizes = None if inputs is None else inputs.get("image_sizes")
        if sizes is None:
            raise InputError(f"prompt {index}: LLaVA-NeXT needs image_sizes (the original H, W of each image, as the "
                             "processor returns them) next to pixel_values")
        sizes = np.asarray(sizes).reshape(-1, 2) if np.asarray(sizes).size else np.zeros((0, 2))
        if len(sizes) != n:
            raise InputError(f"prompt {index}: image_sizes has {len(sizes)} rows for {n} images in pixel_values; "
                             "give one (H, W) per image")
        if (sizes < 1).any():
            raise InputError(f"prompt {index}: image_sizes {sizes.tolist()} holds a non-positive size")
        return [tuple(int(v) for v in row) for row in sizes]

    def split(self, meta, inputs, tokens):
        px = self._pixels(inputs, 0, 5)
        if px is None or len(px) == 0:
            if any(tokens):
                raise InputError("the prompts hold image tokens but no pixel_values were given; preprocess images "
                                 "with the folder's processor")
            return [None] * len(tokens)
        sizes = self._sizes(inputs, 0, len(px))
        out, at = [], 0
        for i, n in enumerate(tokens):
            start, got = at, 0
            while got < n and at < len(px):
                got += self.image_tokens(meta, sizes[at])
                at += 1
            if got != n:
                raise InputError(f"prompt {i} holds {n} image tokens, which no run of the given images makes (their "
                                 "sizes give other counts); build prompts and images with the folder's processor")
            out.append({"pixel_values": px[start:at], "image_sizes": inputs["image_sizes"][start:at]} if at > start
                       else None)
        if at != len(px):
            raise InputError(f"got {len(px)} images but the prompts hold image tokens for {at}")
        return out

    def prepare(self, meta, inputs, index=0):
        import torch

        px = self._pixels(inputs, index, 5)
        if px is None or len(px) == 0:
            return None
        tile = tuple(meta["tile_shape"])
        if tuple(px.shape[2:]) != tile:
            raise InputError(f"prompt {index}: pixel_values must have shape [images, tiles, {', '.join(map(str, tile))}], "
                             f"got {tuple(px.shape)}; preprocess images with the folder's processor")
        sizes = self._sizes(inputs, index, len(px))
        tiles, layout, tokens = [], [], 0
        for j, hw in enumerate(sizes):
            th, tw, window = self._layout(meta, hw)
            n = 1 + th * tw
            if px.shape[1] < n:
                raise InputError(f"prompt {index}: image {j} of size {hw[0]}x{hw[1]} needs {n} tiles, pixel_values has "
                                 f"{px.shape[1]}; image_sizes and pixel_values do not belong together")
            tiles.append(px[j, :n])
            layout.append((th, tw, window))
            tokens += self.image_tokens(meta, hw)
        return Vision(torch.cat(tiles), tokens, len(sizes), {"layout": layout})

    def pack(self, meta, features, vision, extras):
        """features [t,V,D] -> per image: base tile, then the unpadded grid canvas row by row with
        ``image_newline`` after each row -> [tokens, D]."""
        import torch

        side, D = int(meta["feature_side"]), features.shape[-1]
        newline = extras["image_newline"].to(features.dtype)
        out, at = [], 0
        for th, tw, (r0, r1, c0, c1) in vision.info["layout"]:
            tiles = features[at: at + 1 + th * tw]  # [1+th*tw, V, D]
            at += 1 + th * tw
            canvas = tiles[1:].reshape(th, tw, side, side, D).permute(0, 2, 1, 3, 4).reshape(th * side, tw * side, D)
            canvas = canvas[r0:r1, c0:c1]  # [h, w, D]
            rows = torch.cat([canvas, newline.view(1, 1, D).expand(canvas.shape[0], 1, D)], dim=1)
            out += [tiles[0], rows.reshape(-1, D)]
        return torch.cat(out)

    def example(self, meta):
        import torch

        tile = meta["tile_shape"][1]
        size = [tile, tile]
        th, tw, _ = self._layout(meta, size)
        return ({"pixel_values": torch.zeros(1, 1 + th * tw, *meta["tile_shape"]), "image_sizes": torch.tensor([size])},
                self.image_tokens(meta, size))
