"""Small LLaVA checkpoints built from code: a word-level tokenizer, a LlavaProcessor with a chat
template, and a randomly initialised LlavaForConditionalGeneration saved in HF format.

Used for the embedded demo model, the tests and the benchmarks; every checkpoint is a normal
HF folder, so it goes through exactly the loading path a downloaded model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)

#: LLaVA-1.5's conversation format ("USER: <image>\nQ ASSISTANT: A</s>"), as a chat template.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

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

    @property
    def num_visual_tokens(self) -> int:
        n = (self.image_size // self.patch_size) ** 2
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @property
    def vocab(self) -> list[str]:
        seen = dict.fromkeys([*SPECIAL_TOKENS, *BASE_WORDS, *self.words])
        return list(seen)


def build_tokenizer(vocab: list[str]):
    """A whitespace/punctuation word-level fast tokenizer that prepends <s>."""
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
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def build_processor(spec: TinyLlavaSpec):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.vocab),
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(spec: TinyLlavaSpec):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig

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
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
        initializer_range=spec.initializer_range,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_ID,
        image_seq_length=spec.num_visual_tokens,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )


def build_tiny_llava(spec: TinyLlavaSpec, out_dir: str | Path, seed: int = 0, model=None) -> Path:
    """Write a complete HF LLaVA checkpoint folder (random weights unless ``model`` is given)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from .models import quiet_transformers

    quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(build_config(spec)).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(spec).save_pretrained(out_dir)
    return out_dir
