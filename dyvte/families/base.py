"""The model-family adapter: everything dyvte needs to know about one VLM family, in one place.

A family says how to read its Hugging Face checkpoint (class, config keys, where the text decoder
and lm_head live), how to build and check its vision part (pixel tiles -> projected features per
tile: the ``vision`` ONNX graph), how a request's processor outputs become tiles and how the
features of those tiles pack into the prompt's visual tokens (at run time, from the manifest
alone), the prompt's position ids (1-D RoPE, or M-RoPE rows and where decoding continues), and
what the vision side costs in FLOPs. The exporter, runtime, gate training, VTW, eval,
FLOPs, profile, lint and TensorRT profiles ask the family and never test a model type themselves.

Adding a family = one module with a :class:`Family` subclass registered in ``families/__init__``,
plus a tiny offline fixture in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dyvte.errors import InputError, UnsupportedModelError


@dataclass
class Vision:
    """One request's images, checked against the folder: the tiles its vision part runs on and
    how their features pack into the prompt's visual tokens."""

    tiles: object  # the vision input: [t, C, H, W] float32 tiles (Qwen-VL: [patches, C*T*p*p] rows)
    tokens: int  # visual tokens these images become in the prompt
    images: int  # images
    info: dict = field(default_factory=dict)  # family-specific packing facts (e.g. per-image sizes)
    count: int | None = None  # units the folder's per-prompt limit counts (max_tiles); None: len(tiles)
    grids: list = field(default_factory=list)  # per image, the size facts its vision FLOPs need (Qwen-VL: t, h, w)

    @property
    def num_tiles(self) -> int:
        """Tiles (Qwen-VL: images) the vision part encodes for this prompt."""
        return int(self.count) if self.count is not None else len(self.tiles)


class Family:
    """Base class with what LLaVA-style families share; subclasses override what differs."""

    name = "base"
    model_types: tuple[str, ...] = ()  # HF config.model_type values this adapter serves
    hf_class = ""  # transformers class of the checkpoint
    presets: dict[str, str] = {}  # preset name -> Hugging Face repo id
    text_models = ("llama", "mistral", "qwen2")  # decoder backbones dyvte re-implements
    rope_rows = 1  # position-id rows per token (3 for M-RoPE)
    processor_inputs: tuple[str, ...] = ("pixel_values",)  # HF processor tensors the vision side takes
    unsupported_inputs: dict[str, str] = {}  # HF input name -> why dyvte refuses it (e.g. video)
    vision_paths: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector")  # HF vision modules
    # decoder features the adapter declares (exporter/hf.py reads the rest from the HF modules)
    sliding_windows = False  # the decoder's sliding-window layers (layer_types) are exported
    image_bidirectional = False  # an image's tokens attend to each other in both directions (Gemma 3)
    mrope_interleaved = False  # M-RoPE frequency slots interleave t, h, w (Qwen3-VL)

    # -- checkpoint side ---------------------------------------------------------------------------
    def text_config(self, config):
        return config.text_config

    def check_config(self, config) -> None:
        """Refuse checkpoints of this family that dyvte cannot export."""
        text = self.text_config(config)
        if text.model_type not in self.text_models:
            raise UnsupportedModelError(
                f"text backbone '{text.model_type}' of this {self.hf_class} is not supported; supported: "
                f"{', '.join(self.text_models)}"
            )

    stock_processor: str | None = None  # HF processor class to name in saved folders (see save_processor)

    def image_token_id(self, config) -> int:
        return int(config.image_token_id)

    processor_settings: tuple[str, ...] = ()  # processor attributes a folder without processor_config.json lacks

    def image_only_processor(self):
        """The family's processor class without a video processor, for when the stock one cannot be
        built (its video processor needs torchvision); None: the stock processor has no video side."""
        return None

    def processor_defaults(self, config) -> dict:
        """Values of :attr:`processor_settings` as the model's config implies them."""
        return {}

    def load_processor(self, path):
        """The folder's processor by ``AutoProcessor``; if that fails, the :meth:`image_only_processor`
        (what fails for another reason fails there too and is raised from it). Settings that
        processor_config.json does not hold (older folders have none) come from config.json."""
        import json
        from pathlib import Path

        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        except Exception:  # e.g. ImportError, ValueError or OSError: its video processor needs torchvision
            image_only = self.image_only_processor()
            if image_only is None:
                raise
            processor = image_only.from_pretrained(path)
        saved = Path(path) / "processor_config.json"
        saved = json.loads(saved.read_text()) if saved.is_file() else {}
        missing = [name for name in self.processor_settings if name not in saved]
        if missing:
            from transformers import AutoConfig

            defaults = self.processor_defaults(AutoConfig.from_pretrained(path, trust_remote_code=False))
            for name in missing:
                setattr(processor, name, defaults[name])
        return processor

    def save_processor(self, processor, out_dir) -> None:
        """Save the processor as a standard HF processor folder."""
        import json
        from pathlib import Path

        processor.save_pretrained(out_dir)
        if self.stock_processor:  # a stand-in class (e.g. without torchvision) is saved under the stock name
            for name in ("processor_config.json", "tokenizer_config.json"):
                p = Path(out_dir) / name
                if p.is_file():
                    data = json.loads(p.read_text())
                    if "processor_class" in data:
                        data["processor_class"] = self.stock_processor
                        p.write_text(json.dumps(data, indent=2) + "\n")

    def model_class(self):
        import transformers

        return getattr(transformers, self.hf_class)

    def language_model(self, model):
        """The HF text decoder (embed_tokens, layers, norm, rotary_emb)."""
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    def mrope_section(self, model) -> tuple[int, ...] | None:
        """M-RoPE frequency sections (t, h, w chunks) of the text decoder; None for 1-D RoPE."""
        return None

    def deepstack_layers(self, config) -> int:
        """How many decoder layers (0, 1, ...) add a DeepStack vision feature (Qwen3-VL); 0: none."""
        return 0

    def limit_processor(self, processor, max_pixels: int | None, max_input_len: int):
        """Apply the export's image-size limit to the processor that is saved with the folder
        (dynamic-resolution families); fixed-size tile families refuse ``--max-pixels``."""
        if max_pixels is not None:
            raise InputError(f"--max-pixels applies to dynamic-resolution families (Qwen-VL); a {self.hf_class} "
                             "takes fixed-size tiles: bound them with --max-tiles")
        return processor

    def vision_encoder(self, config, dtype, device="cpu"):
        """An (untrained) vision part: tiles [t,C,H,W] -> projected features [t,V,D]."""
        raise NotImplementedError

    def vision_from_hf(self, model, dtype):
        """The vision part with the checkpoint's weights."""
        raise NotImplementedError

    def vision_meta(self, config, processor, module) -> dict:
        """Facts the runtime needs about the vision side (stored in the manifest's ``model``):
        at least ``tile_shape`` [C,H,W], ``tokens_per_tile``, ``tiles_per_image`` (most tiles one image
        makes); the exporter adds ``max_tiles`` (most tiles per prompt)."""
        raise NotImplementedError

    def vision_extras(self, model) -> dict:
        """Tensors the run-time packing needs besides the vision graph (saved in the folder)."""
        return {}

    def hf_tile_features(self, model, tiles):
        """Reference features [t,V,D] of tiles by the HF model itself (export validation)."""
        raise NotImplementedError

    def vision_part(self, module, meta: dict, dim: int, dtype: str):
        """The exported vision part (:class:`dyvte.exporter.parts.Part`): tiles -> features."""
        from dyvte.exporter.parts import vision_part

        return vision_part(module, meta["tile_shape"], meta["tokens_per_tile"], dim, dtype)

    def vision_cases(self, model, part, meta: dict, generator):
        """Export validation of the vision part: (case name, graph feeds, HF reference output)."""
        import torch

        pixels = torch.randn(2, *part.inputs[0].shape[1:], generator=generator)
        yield "", {"pixel_values": pixels}, self.hf_tile_features(model, pixels)

    def hf_positions(self, model, input_ids, attention_mask, vision: dict | None):
        """Position ids [B,S,rope_rows] of a right-padded batch as the HF model computes them
        (training side; 0 at padding)."""
        return (attention_mask.cumsum(1) - 1).clamp(min=0)[..., None]

    def hf_visual_features(self, model, inputs: dict):
        """Visual-token features [n,D] of a batch's processor outputs by the HF model, in prompt
        order (gate training, the exit reference); families with DeepStack return
        {"features": [n,D], "deepstack": [n,k,D]}."""
        raise NotImplementedError

    def hf_layer_inputs(self, lm, hidden, position_ids, key_mask, groups):
        """Per HF decoder layer, (additive attention mask [B,1,S,S] in ``hidden``'s dtype, cos/sin)
        for a right-padded batch (training side): ``position_ids`` in HF's layout, ``key_mask`` [B,S]
        1 = real token, ``groups`` [B,S] image number of each visual token (0 elsewhere). Here
        causal with key padding and one rotary table."""
        import torch

        B, S = key_mask.shape
        causal = torch.ones(S, S, dtype=torch.bool, device=key_mask.device).tril()
        allowed = causal[None] & key_mask.bool()[:, None, :]
        bias = torch.zeros(B, 1, S, S, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
        return [(bias, lm.rotary_emb(hidden, position_ids))] * len(lm.layers)

    def hf_after_layer(self, index: int, hidden, deepstack):
        """Hidden states [B,S,D] after HF decoder layer ``index`` as the next layer gets them
        (DeepStack adds ``deepstack`` [B,S,k,D], 0 at non-visual positions); here unchanged."""
        return hidden

    def collate(self, inputs: list[dict]) -> dict:
        """Processor outputs of several samples -> one batch the HF model takes."""
        import torch

        return {k: torch.cat([torch.as_tensor(x[k]) for x in inputs]) for k in inputs[0]}

    # -- run time (from the manifest alone) --------------------------------------------------------
    tile_unit = "image"  # what one row of pixel_values is to the user (LLaVA-1.5: an image; InternVL: a tile)

    def split(self, meta: dict, inputs: dict, tokens: list[int]) -> list[dict | None]:
        """Batch-level processor tensors -> per prompt, given each prompt's visual-token count.

        Default: ``pixel_values [tiles,C,H,W]`` where every tile makes ``tokens_per_tile`` tokens."""
        V, unit = int(meta["tokens_per_tile"]), self.tile_unit
        counts = []
        for i, n in enumerate(tokens):
            if n % V:
                raise InputError(f"prompt {i} has {n} image tokens, not a multiple of the model's {V} visual tokens "
                                 f"per {unit}; build prompts with the folder's processor")
            counts.append(n // V)
        px = self._pixels(inputs, 0, 4)
        if px is None or len(px) == 0:
            if sum(counts):
                raise InputError(f"the prompts hold {sum(counts)} {unit}(s) but no pixel_values were given; "
                                 "preprocess images with the folder's processor")
            return [None] * len(tokens)
        if len(px) != sum(counts):
            raise InputError(f"got {len(px)} {unit}s but the prompts hold {sum(counts)} {unit}(s) of {V} visual "
                             "tokens each")
        out, at = [], 0
        for c in counts:
            out.append({"pixel_values": px[at: at + c]} if c else None)
            at += c
        return out

    def prepare(self, meta: dict, inputs: dict | None, index: int = 0) -> Vision | None:
        """Check one prompt's processor tensors; the tiles to encode and the tokens they give.

        Default: ``pixel_values [tiles,C,H,W]``, ``tokens_per_tile`` tokens each."""
        px = self._pixels(inputs, index, 4)
        if px is None or len(px) == 0:
            return None
        shape, unit = tuple(meta["tile_shape"]), self.tile_unit
        if tuple(px.shape[1:]) != shape:
            raise InputError(f"prompt {index}: pixel_values must have shape [{unit}s, {', '.join(map(str, shape))}], "
                             f"got {tuple(px.shape)}; preprocess images with the folder's processor")
        return Vision(px, len(px) * int(meta["tokens_per_tile"]), len(px) if unit == "image" else 0)

    def pack(self, meta: dict, features, vision: Vision, extras: dict):
        """Features [t,V,D] of ``vision.tiles`` -> the prompt's visual tokens [vision.tokens, D]."""
        return features.reshape(-1, features.shape[-1])

    def vision_calls(self, meta: dict, visions: list) -> list[dict]:
        """The vision graph's feeds {input name: tensor} for a batch's images: here one call with
        every tile of the batch."""
        import torch

        return [{"pixel_values": torch.cat([v.tiles for v in visions])}]

    def unpack(self, meta: dict, outputs: list, visions: list, extras: dict) -> list:
        """Outputs of :meth:`vision_calls` -> each vision's visual-token features [tokens, D]."""
        feats, out, at = outputs[0], [], 0  # [t,V,D]
        for v in visions:
            out.append(self.pack(meta, feats[at: at + len(v.tiles)], v, extras))
            at += len(v.tiles)
        return out

    def check_ids(self, meta: dict, ids, index: int) -> None:
        """Refuse prompts holding tokens this family's export cannot run (e.g. video placeholders)."""

    def positions(self, meta: dict, visual, vision: Vision | None):
        """Position ids [T, rope_rows] int64 of one prompt (``visual`` [T] bool: its visual
        positions) and the position of the first generated token. 1-D RoPE: 0..T-1, then T."""
        import torch

        T = len(visual)
        return torch.arange(T, dtype=torch.int64)[:, None], T

    def default_max_tiles(self, meta: dict, max_input_len: int) -> int:
        """Most tiles per prompt when the export does not say (--max-tiles): one image's maximum."""
        return int(meta.get("tiles_per_image", 1))

    def min_visual_tokens(self, meta: dict) -> int:
        """Fewest visual tokens one image can become (TensorRT text-profile bound)."""
        return int(meta["tokens_per_tile"])

    def example(self, meta: dict):
        """(processor tensors, visual tokens) of one synthetic image (profiling)."""
        import torch

        return {"pixel_values": torch.zeros(1, *meta["tile_shape"])}, int(meta["tokens_per_tile"])

    def vision_flops(self, meta: dict, vision_config: dict, text_dim: int, tiles: int, grids=None) -> float:
        """FLOPs of encoding ``tiles`` tiles (tower, projector); ``grids``: :attr:`Vision.grids`
        of families whose cost depends on each image's size."""
        raise NotImplementedError

    def vision_profiles(self, meta: dict, max_batch: int) -> dict:
        """TensorRT optimization profiles of the vision part: {name: {axis: (min, opt, max)}}.
        The ``images`` axis counts tiles: up to max_batch x max_tiles."""
        tiles = max_batch * int(meta["max_tiles"])
        return {"default": {"images": (1, min(tiles, int(meta["max_tiles"])), tiles)}}

    def describe(self, meta: dict) -> str:
        """One line on the vision side (``dyvte inspect``)."""
        return (f"tiles {meta['tile_shape']} of {meta['tokens_per_tile']} visual tokens, up to {meta['max_tiles']} "
                "per prompt")

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _pixels(inputs: dict | None, index: int, ndim: int):
        import numpy as np
        import torch

        px = None if inputs is None else inputs.get("pixel_values")
        if px is None:
            return None
        px = torch.as_tensor(np.asarray(px, dtype=np.float32)) if not isinstance(px, torch.Tensor) else px.float()
        if px.ndim != ndim:
            raise InputError(f"prompt {index}: pixel_values must have {ndim} dimensions, got shape {tuple(px.shape)}; "
                             "preprocess images with the folder's processor")
        return px
