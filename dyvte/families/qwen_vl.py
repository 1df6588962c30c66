"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
images of any size and M-RoPE positions. Images only: video inputs are refused.

The processor resizes each image to multiples of patch x merge (28 px) within [min_pixels,
max_pixels] and returns its patches as rows, ``pixel_values`` [patches, C*T*p*p] (the frame twice
for the temporal patch), already in 2x2-merge-block order, plus ``image_grid_thw`` (1, h, w) in
patches and ``mm_token_type_ids``. A ViT with 2-D RoPE over (h, w) (Qwen2.5-VL: RMSNorm, gated SiLU
MLP, window attention in all blocks but ``fullatt_block_indexes``) and the patch merger (4
neighbouring patches -> one token) make h·w/4 visual tokens per image, written as
``<|image_pad|>`` between the text tokens ``<|vision_start|>`` and ``<|vision_end|>``.

The vision graph runs ONE image per call, with a dynamic patch count. What depends on the image's
size is integer work done on the host from its grid: each patch's rotary (h, w) position and, for
Qwen2.5-VL, padded windows (``window_index`` [windows, W]: the patch rows of each window, padding
slots repeat the window's first row; ``window_valid`` [windows, W]: 1 on real slots;
``window_scatter`` [patches]: each patch's slot). Window blocks attend inside [windows, W] tiles
(O(patches·W)); full-attention blocks attend over the whole image and need no mask because the
call holds one image. The batch's images are encoded one after another and their features packed
into their prompts.

The decoder is Qwen2 with M-RoPE: position ids have three rows (t, h, w). Text tokens count up in
all three rows; an image starting at position s gets (s, s + row, s + col) over its merged grid,
and the text after it continues at s + max(rows, cols) (``get_rope_index``). Generated tokens
continue at the largest prompt position + 1 (HF's rope delta), exit or not; an exit keeps every
remaining token's three rows.
"""

from __future__ import annotations

import functools
import math

from dyvte.errors import InputError, UnsupportedModelError

from .base import Family, Vision

#: Text tokens left to a prompt when the export lowers max_pixels so that one image fits max_input_len.
TEXT_ROOM = 64


def rotary_positions(h: int, w: int, merge: int):
    """(h, w) patch coordinates [h*w, 2] int64 in the processor's row order: merged units row-major,
    the merge x merge patches of each unit row-major inside it."""
    import numpy as np

    shape = (h // merge, w // merge, merge, merge)
    rows = np.broadcast_to(np.arange(h).reshape(h // merge, 1, merge, 1), shape)
    cols = np.broadcast_to(np.arange(w).reshape(1, w // merge, 1, merge), shape)
    return np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.int64)


@functools.lru_cache(maxsize=256)
def window_layout(h: int, w: int, merge: int, units: int):
    """Qwen2.5-VL's attention windows of an h x w patch grid, padded: windows of ``units`` x
    ``units`` merged units from the top left, read row-major (as ``get_window_index``).

    Returns (index [windows, W] patch rows of each window (padding: the window's first row),
    valid [windows, W] int64, scatter [h*w]: each patch's slot in the flattened windows), W =
    (units·merge)² slots per window.
    """
    import numpy as np

    gh, gw = h // merge, w // merge
    unit = merge * merge
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    window = (r // units) * -(-gw // units) + c // units  # [gh,gw] window of each merged unit
    order = np.lexsort(((r * gw + c).ravel(), window.ravel()))  # by window, then row-major inside
    wid = window.ravel()[order]
    rows = (order[:, None] * unit + np.arange(unit)).ravel()  # patch rows in window order
    wrow = np.repeat(wid, unit)
    sizes = np.bincount(wrow)
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position inside its window
    W = units * units * unit
    index = np.repeat(rows[np.cumsum(sizes) - sizes], W).reshape(len(sizes), W)
    index[wrow, slot] = rows
    valid = np.zeros((len(sizes), W), dtype=np.int64)
    valid[wrow, slot] = 1
    scatter = np.empty(h * w, dtype=np.int64)
    scatter[rows] = wrow * W + slot
    return index.astype(np.int64), valid, scatter


def most_windows(max_units: int, units: int) -> int:
    """Most windows an image of at most ``max_units`` merged units can have."""
    return max(-(-a // units) * -(-(max_units // a) // units) for a in range(1, max_units + 1))


def image_only_processor_class(base_name: str):
    """``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` without their video processor, which needs
    torchvision (transformers 5 refuses to build the processor without one). Same image and text
    outputs (``input_ids``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``)."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    base = getattr(transformers, base_name)

    class QwenVLImageProcessorOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.image_token))
            self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                                   or tokenizer.convert_tokens_to_ids(self.video_token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    QwenVLImageProcessorOnly.__name__ = QwenVLImageProcessorOnly.__qualname__ = base_name + "ImageOnly"
    return QwenVLImageProcessorOnly


def _torch_modules():
    import torch

    from dyvte.exporter.modules import Float32Frequencies, rotate_half

    class QwenVisionEncoder(Float32Frequencies):
        """The Qwen-VL vision tower + patch merger on ONE image, HF's own blocks and merger:

        pixel_values [P, C*T*p*p], rotary_pos [P, 2] int64 (, window_index [NW, W],
        window_valid [NW, W], window_scatter [P] for windowed blocks) -> features [P/4, D].

        Rows stay in the processor's order throughout (windows gather their rows and scatter
        them back), so the merger's 4 consecutive rows are one 2x2 unit and the output is in
        prompt order. RoPE, softmax and the rotation run in float32.
        """

        def __init__(self, patch_embed, blocks, merger, full_blocks, inv_freq, windowed: bool):
            super().__init__()
            self.patch_embed, self.blocks, self.merger = patch_embed, blocks, merger
            self.full_blocks, self.windowed = set(full_blocks), windowed
            self.register_buffer("inv_freq", inv_freq.float().clone())  # [hd/4] axial RoPE frequencies

        def rope(self, rotary_pos):
            # rotary_pos [P,2] (h, w) -> float32 cos/sin [P,1,hd]: h frequencies, then w, twice
            freqs = rotary_pos[..., None].float() * self.inv_freq.float()  # [P,2,hd/4]
            freqs = freqs.flatten(1)  # [P,hd/2]
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos()[:, None], emb.sin()[:, None]

        @staticmethod
        def attention(attn, x, cos, sin, window=None):
            """Self-attention of one image's rows x [P,E]: over all rows, or inside each window."""
            E = x.shape[-1]
            H = attn.num_heads
            q, k, v = attn.qkv(x).reshape(-1, 3, H, E // H).unbind(1)  # [P,H,hd] each
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
            if window is None:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H,P,hd]
                scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling  # [H,P,P]
                probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
                out = torch.matmul(probs, v).transpose(0, 1).reshape(-1, E)  # [P,E]
            else:
                index, valid, scatter = window  # [NW,W], [NW,W], [P]
                q, k, v = (t[index].permute(0, 2, 1, 3) for t in (q, k, v))  # [NW,H,W,hd]
                zero = torch.zeros((), dtype=torch.float32)
                bias = torch.where(valid > 0, zero, torch.finfo(torch.float32).min)[:, None, None, :]  # [NW,1,1,W]
                scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # [NW,H,W,W]
                probs = torch.softmax(scores.float() + bias, dim=-1).to(v.dtype)
                out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(-1, E)[scatter]  # [P,E]
            return attn.proj(out)

        def forward(self, pixel_values, rotary_pos, *window):
            weight = self.patch_embed.proj.weight  # Conv3d [E,C,T,p,p], kernel = stride = one patch
            x = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()  # [P,E]
            cos, sin = self.rope(rotary_pos)
            for i, blk in enumerate(self.blocks):
                local = window if self.windowed and i not in self.full_blocks else None
                x = x + self.attention(blk.attn, blk.norm1(x), cos, sin, local)
                x = x + blk.mlp(blk.norm2(x))
            return self.merger(x)  # [P/4,D]

    return QwenVisionEncoder


class QwenVL(Family):
    """What Qwen2-VL and Qwen2.5-VL share; the subclasses say what differs (tower, windows)."""

    rope_rows = 3
    processor_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    unsupported_inputs = {
        name: "video inputs are not supported: dyvte exports Qwen-VL for images only; pass images (pixel_values, "
              "image_grid_thw)"
        for name in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    }
    vision_paths = ("model.visual",)
    text_models = ("qwen2_vl_text", "qwen2_5_vl_text")
    windowed = False
    tower_class = ""

    # -- checkpoint side ---------------------------------------------------------------------------
    def image_only_processor(self):
        return image_only_processor_class(self.stock_processor)

    def mrope_section(self, model) -> tuple[int, ...]:
        section = getattr(self.language_model(model).rotary_emb, "mrope_section", None)
        if not section:
            raise UnsupportedModelError(f"this {self.hf_class} has no rope_parameters.mrope_section; dyvte exports "
                                        "Qwen-VL decoders with M-RoPE")
        return tuple(int(x) for x in section)

    def _pixel_limits(self, processor) -> tuple[int, int]:
        size = dict(processor.image_processor.size)
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def limit_processor(self, processor, max_pixels, max_input_len):
        """Lower the saved processor's max_pixels to ``--max-pixels`` and so that one image leaves
        TEXT_ROOM tokens of ``max_input_len`` (images are then resized to fit, as HF does)."""
        ip = processor.image_processor
        lo, hi = self._pixel_limits(processor)
        unit = (ip.patch_size * ip.merge_size) ** 2  # pixels per visual token
        cap = max(unit, (max_input_len - TEXT_ROOM) * unit)
        if max_pixels is not None:
            if max_pixels < max(lo, unit):
                raise InputError(f"--max-pixels {max_pixels} is below the processor's min_pixels {lo} (one visual "
                                 f"token is {unit} pixels); choose at least {max(lo, unit)}")
            cap = min(cap, max_pixels)
        if cap < hi:
            ip.size = {**dict(ip.size), "longest_edge": int(cap)}
        return processor

    def tower_module(self, vision_config):
        import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as m25
        import transformers.models.qwen2_vl.modeling_qwen2_vl as m2

        return getattr(m25 if self.windowed else m2, self.tower_class)._from_config(vision_config)

    def full_blocks(self, vision_config) -> list[int]:
        return list(range(vision_config.depth))

    @staticmethod
    def axial_inv_freq(vision_config):
        """The vision tower's axial RoPE frequencies [hd/4] (as HF computes them, float32)."""
        import torch

        width = vision_config.embed_dim if hasattr(vision_config, "embed_dim") else vision_config.hidden_size
        half = width // vision_config.num_heads // 2
        theta = (getattr(vision_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))

    def vision_encoder(self, config, dtype, device="cpu"):
        import torch

        Encoder = _torch_modules()
        vcfg = config.vision_config
        with torch.device(device):
            tower = self.tower_module(vcfg)
            enc = Encoder(tower.patch_embed, tower.blocks, tower.merger, self.full_blocks(vcfg),
                          self.axial_inv_freq(vcfg).to(device), self.windowed)
        return enc.to(dtype).eval()

    def vision_from_hf(self, model, dtype):
        enc = self.vision_encoder(model.config, dtype)
        missing, unexpected = enc.load_state_dict(model.model.visual.state_dict(), strict=False)
        if [m for m in missing if m != "inv_freq"] or unexpected:
            raise UnsupportedModelError(f"vision tower weights do not match: missing {missing[:3]}, unexpected "
                                        f"{unexpected[:3]}")
        return enc.to(dtype).eval()

    def vision_meta(self, config, processor, module) -> dict:
        vc = config.vision_config
        ip = processor.image_processor
        p, m, T = int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
        if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (p, m, T):
            raise UnsupportedModelError(f"the image processor cuts {ip.patch_size}-px patches (merge {ip.merge_size}, "
                                        f"temporal {ip.temporal_patch_size}), the model expects {p} (merge {m}, "
                                        f"temporal {T}); fix the checkpoint's preprocessor config")
        lo, hi = self._pixel_limits(processor)
        unit = (p * m) ** 2
        width = vc.embed_dim if hasattr(vc, "embed_dim") else vc.hidden_size
        mlp = int(width * vc.mlp_ratio) if hasattr(vc, "mlp_ratio") else int(vc.intermediate_size)
        meta = {
            "tile_shape": [int(vc.in_channels) * T * p * p],  # one patch row
            "patch_size": p, "merge_size": m, "temporal_patch_size": T,
            "min_pixels": lo, "max_pixels": hi,
            "max_patches": hi // (p * p) // (m * m) * (m * m),
            "tokens_per_tile": max(1, -(-lo // unit)),  # fewest tokens the processor makes of an image
            "tiles_per_image": 1,
            "vision_layers": int(vc.depth), "vision_width": int(width), "vision_heads": int(vc.num_heads),
            "vision_mlp": mlp, "gated_mlp": self.windowed, "full_blocks": self.full_blocks(vc),
            "video_token_id": int(config.video_token_id),
        }
        if self.windowed:
            meta["window_units"] = int(vc.window_size) // m // p  # merged units per window side
        return meta

    def default_max_tiles(self, meta, max_input_len):
        return max(1, max_input_len // int(meta["tokens_per_tile"]))  # images per prompt

    def min_visual_tokens(self, meta):
        return 1  # a 2x2-patch image

    def hf_visual_features(self, model, inputs: dict):
        import torch

        out = model.model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                             image_grid_thw=inputs["image_grid_thw"], return_dict=True)
        return torch.cat(list(out.pooler_output))

    def hf_positions(self, model, input_ids, attention_mask, vision):
        """HF's ``get_rope_index`` rows, as [B,S,3]."""
        image = ((input_ids == model.config.image_token_id) & attention_mask.bool()).int()
        grids = None if vision is None else vision.get("image_grid_thw")
        pos, _ = model.model.get_rope_index(input_ids, image, image_grid_thw=grids, attention_mask=attention_mask)
        return pos.permute(1, 2, 0)

    def collate(self, inputs: list[dict]) -> dict:
        import torch

        return {k: torch.cat([torch.as_tensor(x[k]) for x in inputs]) for k in ("pixel_values", "image_grid_thw")}

    # -- the vision graph ----------------------------------------------------------------------------
    def image_feeds(self, meta: dict, grid, rows) -> dict:
        """The vision graph's feeds for one image: patch rows [P, C*T*p*p] of grid (1, h, w)."""
        import torch

        _, h, w = (int(x) for x in grid)
        m = int(meta["merge_size"])
        feeds = {"pixel_values": rows, "rotary_pos": torch.from_numpy(rotary_positions(h, w, m))}
        if self.windowed:
            index, valid, scatter = window_layout(h, w, m, int(meta["window_units"]))
            feeds.update(window_index=torch.from_numpy(index), window_valid=torch.from_numpy(valid),
                         window_scatter=torch.from_numpy(scatter))
        return feeds

    def _example_grid(self, meta: dict, side: int | None = None) -> tuple[int, int, int]:
        """A synthetic image's grid (1, h, w) within the folder's limits; windows cut unless tiny."""
        m = int(meta["merge_size"])
        units = int(meta["max_patches"]) // (m * m)
        win = int(meta.get("window_units", 4))
        a = side or win + 1
        b = 2 * a - 1
        while a * b > units and b > 1:
            b -= 1
            a = min(a, b + 1)
        return 1, a * m, max(b, 1) * m

    def vision_part(self, module, meta, dim, dtype):
        import torch

        from dyvte.exporter.parts import Part, TensorSpec

        grid = self._example_grid(meta)
        rows = torch.randn(grid[1] * grid[2], meta["tile_shape"][0], generator=torch.Generator().manual_seed(3))
        feeds = self.image_feeds(meta, grid, rows)
        inputs = [TensorSpec("pixel_values", ["patches", meta["tile_shape"][0]], "float32"),
                  TensorSpec("rotary_pos", ["patches", 2], "int64")]
        if self.windowed:
            W = feeds["window_valid"].shape[1]
            inputs += [TensorSpec("window_index", ["windows", W], "int64"),
                       TensorSpec("window_valid", ["windows", W], "int64"),
                       TensorSpec("window_scatter", ["patches"], "int64")]
        return Part("vision", "vision", module, inputs, [TensorSpec("image_features", ["tokens", dim], dtype)],
                    tuple(feeds[t.name] for t in inputs))

    def vision_cases(self, model, part, meta, generator):
        """Images of several sizes (windows cut at the edges), each against HF's tower + merger."""
        import torch

        m = int(meta["merge_size"])
        seen = set()
        for side in (1, 2, None, 3):
            grid = self._example_grid(meta, side)
            if grid in seen:
                continue
            seen.add(grid)
            rows = torch.randn(grid[1] * grid[2], meta["tile_shape"][0], generator=generator)
            ref = model.model.visual(rows, grid_thw=torch.tensor([grid])).pooler_output
            yield f"{grid[1] // m}x{grid[2] // m} tokens", self.image_feeds(meta, grid, rows), ref

    def vision_calls(self, meta, visions):
        calls = []
        for v in visions:
            at = 0
            for grid in v.grids:
                n = grid[0] * grid[1] * grid[2]
                calls.append(self.image_feeds(meta, grid, v.tiles[at: at + n]))
                at += n
        return calls

    def unpack(self, meta, outputs, visions, extras):
        import torch

        out, at = [], 0
        for v in visions:
            out.append(torch.cat(outputs[at: at + len(v.grids)]))  # [tokens, D], images in prompt order
            at += len(v.grids)
        return out

    def vision_profiles(self, meta, max_batch):
        m2 = int(meta["merge_size"]) ** 2
        most = int(meta["max_patches"])
        axes = {"patches": (m2, min(most, 1024), most)}
        if self.windowed:
            win = int(meta["window_units"])
            wins = most_windows(most // m2, win)
            axes["windows"] = (1, min(wins, -(-min(most, 1024) // (m2 * win * win))), wins)
        return {"default": axes}

    def describe(self, meta):
        return (f"images of any size up to {meta['max_pixels']} px ({meta['max_patches']} patches of "
                f"{meta['patch_size']} px, {meta['max_patches'] // meta['merge_size'] ** 2} visual tokens), up to "
                f"{meta['max_tiles']} per prompt")

    def example(self, meta):
        import torch

        m = int(meta["merge_size"])
        units = int(meta["max_patches"]) // (m * m)
        side = max(1, int(math.isqrt(min(units, 256))))
        grid = [1, side * m, side * m]
        return ({"pixel_values": torch.zeros(side * side * m * m, meta["tile_shape"][0]),
                 "image_grid_thw": torch.tensor([grid])}, side * side)

    # -- run time ----------------------------------------------------------------------------------
    def _grids(self, meta, inputs, index: int):
        import numpy as np

        grids = None if inputs is None else inputs.get("image_grid_thw")
        if grids is None:
            raise InputError(f"prompt {index}: Qwen-VL needs image_grid_thw (each image's (t, h, w) patch grid, as the "
                             "processor returns it) next to pixel_values")
        grids = np.asarray(grids)
        if grids.size == 0 or grids.ndim != 2 or grids.shape[1] != 3 or grids.dtype.kind not in "iu":
            raise InputError(f"prompt {index}: image_grid_thw must be integers [images, 3], got shape "
                             f"{tuple(grids.shape)}; pass what the processor returns")
        m = int(meta["merge_size"])
        out = []
        for j, (t, h, w) in enumerate(grids.tolist()):
            if t != 1:
                raise InputError(f"prompt {index}: image_grid_thw row {j} has t={t}: several frames are video, which "
                                 "is not supported; pass single images")
            if h < m or w < m or h % m or w % m:
                raise InputError(f"prompt {index}: image_grid_thw row {j} ({t}, {h}, {w}) is not a grid of whole "
                                 f"{m}x{m} patch blocks; pass what the processor returns")
            if h * w > int(meta["max_patches"]):
                raise InputError(f"prompt {index}: image {j} has {h}x{w} patches ({h * w * meta['patch_size'] ** 2} px), "
                                 f"above this engine folder's limit of {meta['max_patches']} patches ({meta['max_pixels']} "
                                 "px); resize the image with the folder's processor or re-export with a larger "
                                 "--max-pixels")
            out.append((1, h, w))
        return out

    def _check_types(self, inputs, index: int, tokens: int) -> None:
        """``mm_token_type_ids`` (optional): no video entries, as many image entries as tokens."""
        import numpy as np

        types = None if inputs is None else inputs.get("mm_token_type_ids")
        if types is None:
            return
        types = np.asarray(types)
        if (types == 2).any():
            raise InputError(f"prompt {index}: mm_token_type_ids marks video tokens; video inputs are not supported, "
                             "dyvte exports Qwen-VL for images only")
        if int((types == 1).sum()) != tokens:
            raise InputError(f"prompt {index}: mm_token_type_ids marks {int((types == 1).sum())} image tokens but "
                             f"image_grid_thw gives {tokens}; they do not belong together")

    def split(self, meta, inputs, tokens):
        import numpy as np

        px = self._pixels(inputs, 0, 2)
        if px is None or len(px) == 0:
            if any(tokens):
                raise InputError("the prompts hold image tokens but no pixel_values were given; preprocess images with "
                                 "the folder's processor")
            return [None] * len(tokens)
        grids = self._grids(meta, inputs, 0)
        m2 = int(meta["merge_size"]) ** 2
        types = inputs.get("mm_token_type_ids")
        types = None if types is None else np.asarray(types).reshape(len(tokens), -1)
        out, at, row = [], 0, 0  # next image, next patch row
        for i, n in enumerate(tokens):
            start, got = at, 0
            while got < n and at < len(grids):
                got += grids[at][1] * grids[at][2] // m2
                at += 1
            if got != n:
                raise InputError(f"prompt {i} holds {n} image tokens, which no run of the given image_grid_thw makes; "
                                 "build prompts and images with the folder's processor")
            if at == start:
                out.append(None)
                continue
            patches = sum(g[1] * g[2] for g in grids[start:at])
            one = {"pixel_values": px[row: row + patches], "image_grid_thw": np.asarray(grids[start:at])}
            if types is not None:
                one["mm_token_type_ids"] = types[i]
            out.append(one)
            row += patches
        if at != len(grids):
            raise InputError(f"got {len(grids)} images in image_grid_thw but the prompts hold image tokens for {at}")
        if row != len(px):
            raise InputError(f"image_grid_thw describes {row} patches but pixel_values has {len(px)} rows; they do "
                             "not belong together")
        return out

    def prepare(self, meta, inputs, index=0):
        px = self._pixels(inputs, index, 2)
        if px is None or len(px) == 0:
            return None
        width = int(meta["tile_shape"][0])
        if px.shape[1] != width:
            raise InputError(f"prompt {index}: pixel_values must have shape [patches, {width}], got {tuple(px.shape)}; "
                             "preprocess images with the folder's processor")
        grids = self._grids(meta, inputs, index)
        patches = sum(g[1] * g[2] for g in grids)
        if patches != len(px):
            raise InputError(f"prompt {index}: image_grid_thw describes {patches} patches but pixel_values has "
                             f"{len(px)} rows; they do not belong together")
        tokens = patches // int(meta["merge_size"]) ** 2
        self._check_types(inputs, index, tokens)
        return Vision(px, tokens, len(grids), {}, count=len(grids), grids=[list(g) for g in grids])

    def check_ids(self, meta, ids, index):
        video = meta.get("video_token_id")
        if video is not None and bool((ids == int(video)).any()):
            raise InputError(f"prompt {index} holds video tokens (<|video_pad|>); video inputs are not supported, "
                             "dyvte exports Qwen-VL for images only")

    def positions(self, meta, visual, vision):
        """M-RoPE rows [T,3] of one prompt, as ``get_rope_index``: text counts up in all rows, each
        image's tokens get (s, s + row, s + col) over its merged grid from its start s, and the text
        after it continues at s + max(rows, cols). Next position: the largest + 1."""
        import torch

        m = int(meta["merge_size"])
        flags = visual.tolist()
        T = len(flags)
        pos = torch.empty(T, 3, dtype=torch.int64)
        grids = list(vision.grids) if vision is not None else []
        i = cur = image = 0
        while i < T:
            j = i
            if not flags[i]:
                while j < T and not flags[j]:
                    j += 1
                pos[i:j] = (torch.arange(j - i) + cur)[:, None]
                cur += j - i
            else:
                if image >= len(grids):
                    raise InputError("the prompt holds more image tokens than its images make; build prompt and "
                                     "images with the folder's processor")
                t, h, w = (int(x) for x in grids[image])
                gh, gw = h // m, w // m
                j = i + t * gh * gw
                if j > T or not all(flags[i:j]):
                    raise InputError(f"image {image}'s {t * gh * gw} tokens ({gh}x{gw}, from image_grid_thw) do not "
                                     "match the prompt's run of image tokens; image_grid_thw and the prompt do not "
                                     "belong together")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
                pos[i:j] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=-1) + cur
                cur += max(gh, gw)
                image += 1
            i = j
        return pos, (int(pos.max()) + 1 if T else 0)

    def vision_flops(self, meta, vision_config, text_dim, tiles, grids=None):
        """Per image of P patches (width E, MLP width M): patch embedding 2·P·(C·T·p²)·E; per block
        projections 8·P·E² and the MLP (4·P·E·M, gated: 6·P·E·M); attention 4·P²·E in full blocks
        and 4·E·Σ n_w² over the windows (n_w patches each) in window blocks; merger
        2·(P/4)·4E·(4E + D)."""
        E, M, depth = int(meta["vision_width"]), int(meta["vision_mlp"]), int(meta["vision_layers"])
        full = set(meta["full_blocks"])
        m = int(meta["merge_size"])
        total = 0.0
        for t, h, w in (grids or []):
            P = t * h * w
            per_block = 8 * P * E * E + (6 if meta["gated_mlp"] else 4) * P * E * M
            if self.windowed:
                _, valid, _ = window_layout(h, w, m, int(meta["window_units"]))
                windowed = 4 * E * float((valid.sum(1).astype(float) ** 2).sum())
            else:
                windowed = 4 * P * P * E
            attention = sum(4 * P * P * E if i in full else windowed for i in range(depth))
            tokens = P // (m * m)
            total += (2 * P * meta["tile_shape"][0] * E + depth * per_block + attention
                      + 2 * tokens * 4 * E * (4 * E + text_dim))
        return total


class Qwen2VL(QwenVL):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    hf_class = "Qwen2VLForConditionalGeneration"
    presets = {"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct"}
    stock_processor = "Qwen2VLProcessor"
    tower_class = "Qwen2VisionTransformerPretrainedModel"


class Qwen25VL(QwenVL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    presets = {"qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct"}
    stock_processor = "Qwen2_5_VLProcessor"
    tower_class = "Qwen2_5_VisionTransformerPretrainedModel"
    windowed = True

    def full_blocks(self, vision_config):
        return sorted(int(i) for i in vision_config.fullatt_block_indexes)

    def vision_meta(self, config, processor, module):
        meta = super().vision_meta(config, processor, module)
        vc = config.vision_config
        if vc.window_size % (vc.spatial_merge_size * vc.patch_size):
            raise UnsupportedModelError(f"window_size {vc.window_size} is not a multiple of patch x merge "
                                        f"({vc.patch_size * vc.spatial_merge_size} px)")
        return meta
