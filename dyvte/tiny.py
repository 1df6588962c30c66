"""Small VLM checkpoints built from code (LLaVA-1.5, LLaVA-NeXT, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Gemma 3): a word-level tokenizer, the family's processor with a chat template, and a randomly
initialised model saved in HF format.

Used for the embedded demo model, the tests and the benchmarks; every checkpoint is a normal
HF folder, so it goes through exactly the loading path a downloaded model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)

#: InternVL's image tokens (text delimiters and the placeholder the features fill).
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}

#: Qwen-VL's image tokens: the placeholder the features fill, the video placeholder and the text
#: delimiters around each image.
QWEN_VL_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

#: Gemma 3's image tokens: the delimiters around each image (text) and the placeholder the features fill.
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def chat_template(image: str = "<image>") -> str:
    """LLaVA-1.5's conversation format ("USER: <image>\nQ ASSISTANT: A</s>") as a chat template,
    with ``image`` as the image placeholder."""
    return (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}USER: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + "\n"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
        "{% else %}ASSISTANT: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template()

BASE_WORDS = ("USER", "ASSISTANT", ":", "?", ".", ",")


@dataclass
class TinyLlavaSpec:
    """Shape of a small LLaVA. Defaults: 4 decoder layers, GQA, 30x30 images, 25 visual tokens."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    text_model: str = "llama"  # llama | mistral | qwen2
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 64
    image_size: int = 30
    patch_size: int = 6
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    words: tuple[str, ...] = field(
        default=(
            "what", "which", "is", "the", "a", "of", "in", "color", "shape", "there", "how",
            "many", "red", "green", "blue", "yellow", "circle", "square", "triangle", "yes",
            "no", "left", "right", "top", "bottom", "one", "two", "three", "image", "picture",
        )
    )
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    family: str = "llava"  # llava | llava_next | internvl | qwen2_vl | qwen2_5_vl | qwen3_vl | gemma3
    grid_pinpoints: tuple = ()  # llava_next (H, W) pairs; default 1x2, 2x1 and 2x2 tiles
    downsample_ratio: float = 0.5  # internvl pixel shuffle
    max_patches: int = 6  # internvl tiles per image (+ a thumbnail)
    min_pixels: int = 0  # qwen: image pixel range of the processor (0: 4 and 100 visual tokens)
    max_pixels: int = 0
    window_size: int = 0  # qwen2_5_vl window side in pixels (0: 3 merged units)
    full_blocks: tuple = (1,)  # qwen2_5_vl full-attention vision blocks
    mrope_section: tuple = ()  # qwen: frequency slots of the t, h, w rows (default: head_dim/2 split 1:1.5:1.5)
    deepstack: tuple = (0, 1)  # qwen3_vl: vision blocks whose features DeepStack adds after decoder layers 0, 1, ...
    position_grid: int = 4  # qwen3_vl: side of the learned vision position table
    layer_types: tuple = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")  # gemma3
    sliding_window: int = 8  # gemma3
    query_pre_attn_scalar: int = 24  # gemma3 (attention scale 24 ** -0.5, not head_dim ** -0.5)
    mm_tokens_per_image: int = 16  # gemma3: visual tokens per image (the patch grid average-pooled)
    qk_norm_scale: float = 2.0  # qwen3_vl, gemma3: mean scale of the random q/k norms (1: as initialised)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per tile (LLaVA-1.5: per image; Qwen-VL: fewest per image)."""
        if self.family in QWEN_FAMILIES:
            return max(1, -(-self.pixel_range[0] // (2 * self.patch_size) ** 2))
        if self.family == "gemma3":
            return self.mm_tokens_per_image
        n = (self.image_size // self.patch_size) ** 2
        if self.family == "internvl":
            return int(n * self.downsample_ratio ** 2)
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @property
    def pinpoints(self) -> list[list[int]]:
        s = self.image_size
        return [list(p) for p in self.grid_pinpoints] or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]

    @property
    def pixel_range(self) -> tuple[int, int]:
        """Qwen-VL processor's (min_pixels, max_pixels)."""
        token = (2 * self.patch_size) ** 2  # pixels per visual token (2x2 merge)
        return self.min_pixels or 4 * token, self.max_pixels or 100 * token

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens of the tokenizer (``image_token`` etc.)."""
        if self.family == "internvl":
            return dict(INTERNVL_TOKENS)
        if self.family in QWEN_FAMILIES:
            return dict(QWEN_VL_TOKENS)
        if self.family == "gemma3":
            return dict(GEMMA3_TOKENS)
        return {"image_token": "<image>"}

    @property
    def image_placeholder(self) -> str:
        """The token image features fill."""
        tokens = self.special_tokens
        return tokens.get("context_image_token") or tokens.get("image_token", "<image>")

    @property
    def image_markup(self) -> str:
        """What the chat template writes for one image."""
        if self.family in QWEN_FAMILIES:
            return "<|vision_start|><|image_pad|><|vision_end|>"
        if self.family == "gemma3":
            return GEMMA3_TOKENS["boi_token"]  # the processor expands it into boi, the soft tokens, eoi
        return self.image_placeholder

    @property
    def vocab(self) -> list[str]:
        extra = [t for t in self.special_tokens.values() if t not in SPECIAL_TOKENS]
        seen = dict.fromkeys([*SPECIAL_TOKENS, *extra, *BASE_WORDS, *self.words])
        return list(seen)

    @property
    def image_token_id(self) -> int:
        return self.vocab.index(self.image_placeholder)


def build_tokenizer(vocab: list[str], special_tokens: dict | None = None):
    """A whitespace/punctuation word-level fast tokenizer that prepends <s>; ``special_tokens``:
    named special tokens (default ``{"image_token": "<image>"}``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=special_tokens or {"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(spec: TinyLlavaSpec):
    """The family's processor with a word-level tokenizer and LLaVA-1.5's chat format."""
    tokenizer = build_tokenizer(spec.vocab, spec.special_tokens)
    template = chat_template(spec.image_markup)
    if spec.family in QWEN_FAMILIES:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .families import family_named
        from .families.qwen_vl import image_only_processor_class

        lo, hi = spec.pixel_range
        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if spec.family == "qwen3_vl" else {}
        ip = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi, patch_size=spec.patch_size, merge_size=2,
                                      temporal_patch_size=2, **norm)
        cls = image_only_processor_class(family_named(spec.family).stock_processor)
        return cls(image_processor=ip, tokenizer=tokenizer, chat_template=template)
    if spec.family == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        ip = Gemma3ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size})
        return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_length=spec.mm_tokens_per_image,
                               chat_template=template)
    if spec.family == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": spec.image_size}, image_grid_pinpoints=spec.pinpoints,
                                        crop_size={"height": spec.image_size, "width": spec.image_size})
        return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=spec.patch_size,
                                  vision_feature_select_strategy=spec.vision_feature_select_strategy,
                                  num_additional_image_tokens=1, chat_template=template)
    if spec.family == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from .families.internvl import image_only_processor_class

        ip = GotOcr2ImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size}, crop_to_patches=True,
                                      min_patches=1, max_patches=spec.max_patches)
        return image_only_processor_class()(image_processor=ip, tokenizer=tokenizer,
                                            image_seq_length=spec.num_visual_tokens, chat_template=template)
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template,
    )


def _gemma3_config(spec: TinyLlavaSpec):
    from transformers import Gemma3Config

    ids = {name: spec.vocab.index(tok) for name, tok in GEMMA3_TOKENS.items()}
    text = dict(vocab_size=len(spec.vocab), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, head_dim=spec.hidden_size // spec.num_heads,
                query_pre_attn_scalar=spec.query_pre_attn_scalar, sliding_window=spec.sliding_window,
                layer_types=list(spec.layer_types), max_position_embeddings=spec.max_position_embeddings,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": spec.rope_theta},
                                 "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=spec.initializer_range)
    vision = dict(hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=spec.mm_tokens_per_image,
                        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                        image_token_index=ids["image_token"], initializer_range=spec.initializer_range)


def _qwen_config(spec: TinyLlavaSpec):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2
    section = list(spec.mrope_section) or [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text = dict(vocab_size=len(spec.vocab), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
                rope_theta=spec.rope_theta, rope_scaling={"type": "mrope", "mrope_section": section},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                initializer_range=spec.initializer_range)
    ids = {name: spec.vocab.index(tok) for name, tok in QWEN_VL_TOKENS.items()}
    common = dict(text_config=text, image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                  vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"],
                  tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = dict(depth=spec.vision_layers, num_heads=spec.vision_heads, patch_size=spec.patch_size,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=spec.initializer_range)
    if spec.family == "qwen3_vl":  # Qwen3 decoder (head_dim, q/k norm), interleaved M-RoPE, DeepStack
        dropped = ("rope_theta", "rope_scaling", "bos_token_id", "eos_token_id")
        text = {k: v for k, v in text.items() if k not in dropped}
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                                                        "mrope_section": section, "mrope_interleaved": True})
        vision.update(hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                      out_hidden_size=spec.hidden_size, num_position_embeddings=spec.position_grid ** 2,
                      deepstack_visual_indexes=list(spec.deepstack))
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **{k: v for k, v in common.items() if k not in ("text_config", "tie_word_embeddings",
                                                                             "bos_token_id", "eos_token_id",
                                                                             "pad_token_id")})
    if spec.family == "qwen2_vl":
        return Qwen2VLConfig(vision_config=dict(vision, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                                                mlp_ratio=spec.vision_intermediate_size // spec.vision_hidden_size),
                             **common)
    window = spec.window_size or 3 * 2 * spec.patch_size
    return Qwen2_5_VLConfig(vision_config=dict(vision, hidden_size=spec.vision_hidden_size,
                                               intermediate_size=spec.vision_intermediate_size,
                                               out_hidden_size=spec.hidden_size, window_size=window,
                                               fullatt_block_indexes=list(spec.full_blocks)), **common)


def build_config(spec: TinyLlavaSpec):
    from transformers import AutoConfig, CLIPVisionConfig, InternVLConfig, LlavaConfig, LlavaNextConfig

    if spec.family in QWEN_FAMILIES:
        return _qwen_config(spec)
    if spec.family == "gemma3":
        return _gemma3_config(spec)

    text_kwargs = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=len(spec.vocab),
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=spec.initializer_range,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=False,
    )
    if spec.text_model == "mistral":
        text_kwargs["sliding_window"] = None
    text_config = AutoConfig.for_model(spec.text_model, **text_kwargs)
    vision = dict(hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  initializer_range=spec.initializer_range)
    if spec.family == "internvl":
        return InternVLConfig(
            vision_config=dict(vision, image_size=[spec.image_size] * 2, patch_size=[spec.patch_size] * 2),
            text_config=text_config.to_dict(), image_token_id=spec.image_token_id,
            image_seq_length=spec.num_visual_tokens, downsample_ratio=spec.downsample_ratio,
            vision_feature_layer=spec.vision_feature_layer, tie_word_embeddings=False,
            vision_feature_select_strategy=spec.vision_feature_select_strategy)
    vision_config = CLIPVisionConfig(**vision, image_size=spec.image_size, patch_size=spec.patch_size,
                                     projection_dim=spec.vision_hidden_size)
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=spec.image_token_id,
                  image_seq_length=spec.num_visual_tokens, vision_feature_layer=spec.vision_feature_layer,
                  vision_feature_select_strategy=spec.vision_feature_select_strategy)
    if spec.family == "llava_next":
        return LlavaNextConfig(**common, image_grid_pinpoints=spec.pinpoints)
    return LlavaConfig(**common)


@dataclass(frozen=True)
class Layout:
    """Which files hold a checkpoint folder's processor settings and chat template. Default: what
    transformers 5's ``save_pretrained`` writes."""

    # nested: the image processor inside processor_config.json (transformers 5); separate:
    # preprocessor_config.json, plus processor_config.json when the processor has settings of its own
    # (transformers 4, e.g. llava-hf/*); none: preprocessor_config.json alone (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*)
    processor_config: str = "nested"
    # the files holding the template: chat_template.jinja, chat_template.json ({"chat_template": ...}),
    # tokenizer_config.json (its "chat_template" entry); () for none
    chat_template: tuple[str, ...] = ("chat_template.jinja",)
    video_config: bool = False  # video_preprocessor_config.json too (transformers >= 4.52 saves of video families)
    # the class names the Hub's preprocessor_config.json gives: (saved name prefix, Hub name) pairs
    image_processor_names: tuple[tuple[str, str], ...] = ()
    pixel_range_keys: bool = True  # Qwen-VL's image size as min_pixels/max_pixels (Qwen2/2.5-VL), else size (Qwen3-VL)


#: Layouts published checkpoints come in.
LAYOUTS = {
    "saved": Layout(),  # saved by transformers 5
    "llava-hf": Layout("separate", ("chat_template.json",)),  # llava-hf/llava-1.5-7b-hf, llava-v1.6-*
    "internvl3-hf": Layout("separate", ("chat_template.jinja",), video_config=True),  # OpenGVLab/InternVL3-*-hf
    "qwen2.5-vl": Layout("none", ("chat_template.json", "tokenizer_config.json")),  # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2-vl-early": Layout("none", ("tokenizer_config.json",)),  # early Qwen/Qwen2-VL-* revisions, fine-tunes
    "none-jinja": Layout("none", ("chat_template.jinja",)),  # fine-tunes saved without a processor config
    "qwen3-vl": Layout("none", ("chat_template.json",), video_config=True, pixel_range_keys=False,
                       image_processor_names=(("Qwen2VL", "Qwen2VLImageProcessorFast"),)),  # Qwen/Qwen3-VL-*-Instruct
    "gemma-3": Layout("separate", ("chat_template.json",),
                      image_processor_names=(("Gemma3", "Gemma3ImageProcessor"),)),  # google/gemma-3-*-it
}

#: Video processors of the processors that have one (written by ``Layout.video_config``).
VIDEO_PROCESSORS = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                    "Qwen3VLProcessor": "Qwen3VLVideoProcessor", "InternVLProcessor": "InternVLVideoProcessor"}


def write_layout(out_dir: str | Path, layout: Layout) -> None:
    """Rewrite the processor files of a folder saved by transformers 5 into ``layout``, with exactly
    the files a checkpoint of that layout has (Qwen2/2.5-VL's image processor as their Hub files write
    it: ``min_pixels``/``max_pixels``)."""
    import json

    out_dir = Path(out_dir)

    def read(name):
        return json.loads((out_dir / name).read_text())

    def write(name, data):
        (out_dir / name).write_text(json.dumps(data, indent=2) + "\n")

    proc = read("processor_config.json")
    cls = proc["processor_class"]
    if layout.processor_config != "nested":
        image = {**proc.pop("image_processor"), "processor_class": cls}
        if image["image_processor_type"].startswith("Qwen2VL") and layout.pixel_range_keys:
            size = image.pop("size")
            image.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        for prefix, hub_name in layout.image_processor_names:
            if image["image_processor_type"].startswith(prefix):
                image["image_processor_type"] = hub_name
        write("preprocessor_config.json", image)
        if layout.processor_config == "separate" and set(proc) != {"processor_class"}:
            write("processor_config.json", proc)
        else:
            (out_dir / "processor_config.json").unlink()
    if layout.video_config and cls in VIDEO_PROCESSORS:
        write("video_preprocessor_config.json", {"video_processor_type": VIDEO_PROCESSORS[cls], "processor_class": cls})
    template_file = out_dir / "chat_template.jinja"
    template = template_file.read_text()
    template_file.unlink()
    for name in layout.chat_template:
        if name == "chat_template.jinja":
            template_file.write_text(template)
        elif name == "chat_template.json":
            write(name, {"chat_template": template})
        else:
            write(name, {**read(name), "chat_template": template})


def build_tiny_llava(spec: TinyLlavaSpec, out_dir: str | Path, seed: int = 0, model=None,
                     layout: Layout | None = None) -> Path:
    """Write a complete HF checkpoint folder of the spec's family (random weights unless ``model``
    is given; InternVL's layer scales, CLS token and position embeddings are randomised too, so
    that they matter), with its processor files in ``layout`` (default: as transformers 5 saves them)."""
    import torch

    from .families import family_named
    from .models import quiet_transformers

    quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_named(spec.family)
    if model is None:
        torch.manual_seed(seed)
        model = family.model_class()(build_config(spec)).eval()
        with torch.no_grad():
            if spec.family == "internvl":
                emb = model.model.vision_tower.embeddings
                emb.cls_token.normal_(0.0, 0.5)
                emb.position_embeddings.normal_(0.0, 0.5)
                for layer in model.model.vision_tower.encoder.layer:
                    layer.lambda_1.uniform_(0.5, 1.5)
                    layer.lambda_2.uniform_(0.5, 1.5)
            if spec.family == "llava_next":
                model.model.image_newline.normal_(0.0, 1.0)
            for name, p in model.named_parameters():
                # q/k norms set the attention's sharpness (q.k no longer grows with the weights): scale them up;
                # Gemma's (1 + w) norms and its projection start at 0: make them matter
                if "q_norm" in name or "k_norm" in name:
                    p.normal_(spec.qk_norm_scale - (spec.family == "gemma3"), 0.3)
                elif spec.family == "gemma3" and ("norm" in name or "mm_input_projection_weight" in name):
                    p.normal_(0.0, 0.5)
        for key, value in (("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID), ("pad_token_id", PAD_ID)):
            setattr(model.generation_config, key, value)
    model.save_pretrained(out_dir, safe_serialization=True)
    family.save_processor(build_processor(spec), out_dir)
    if layout is not None:
        write_layout(out_dir, layout)
    return out_dir
