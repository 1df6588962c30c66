"""Tiny LLaVA checkpoints and engine folders shared by the tests (built once per session)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class TinyModel:
    name: str
    model_dir: Path
    engine_dir: Path
    spec: object
    candidates: list
    gates: dict | None
    gates_file: Path | None

    _hf = None

    @property
    def hf(self):
        if self._hf is None:
            from dyvte.models import load_model

            self._hf = load_model(self.model_dir)
        return self._hf


def make_gates(num_layers: int, dim: int, hidden: int = 16, seed: int = 0, layers=None, scale: float = 2.0) -> dict:
    """Random gates whose exit probabilities spread over (0, 1) on tiny models."""
    import torch

    g = torch.Generator().manual_seed(seed)
    layers = layers if layers is not None else range(1, num_layers)
    return {k: (torch.randn(hidden, 2 * dim, generator=g) * scale, torch.randn(2, hidden, generator=g) * scale)
            for k in layers}


# (name, spec kwargs, candidates, with gates)
def _synth_words():
    from dyvte.synth import vocabulary

    return tuple(vocabulary())


MODELS = {
    "llama_gqa": (dict(), [1, 2, 3], True),  # GQA 4/2, 30x30 image (patch 6 -> 25 visual tokens)
    "qwen2_full": (dict(text_model="qwen2", num_heads=4, num_kv_heads=4, num_layers=5, image_size=42,
                        patch_size=7, vision_feature_layer=-1, vision_feature_select_strategy="full",
                        hidden_size=48, intermediate_size=96, vision_layers=3), [2, 4], True),
    # vocabulary of the synthetic QA set, 96 px images, patch 24 -> 16 visual tokens
    "synth": (dict(image_size=96, patch_size=24, words=None, initializer_range=0.2), [1, 2, 3], True),
    # LLaVA-NeXT: 30 px tiles of 25 tokens, 1x2 / 2x1 / 2x2 grids: 1 + up to 4 tiles, 80-135 tokens per image
    "llava_next": (dict(family="llava_next", image_size=30, patch_size=6, initializer_range=0.1), [1, 2, 3], True),
    # InternVL: Qwen2 decoder (QKV bias), 32 px tiles, patch 4, pixel shuffle -> 16 tokens, up to 6 tiles + thumbnail
    "internvl": (dict(family="internvl", text_model="qwen2", image_size=32, patch_size=4, vision_feature_layer=-1,
                      max_patches=4, initializer_range=0.1), [1, 2, 3], True),
    # Qwen2-VL: M-RoPE (section [2,3,3]), patch 4 + 2x2 merge: an image of any size up to 6,400 px becomes
    # 4-100 visual tokens (one per 8x8 px)
    "qwen2_vl": (dict(family="qwen2_vl", patch_size=4, initializer_range=0.05), [1, 2, 3], True),
    # Qwen2.5-VL: the same, with 3 vision blocks of which block 1 attends fully, the others in windows of
    # 3x3 tokens (24 px), so the test images' windows are cut at their edges
    "qwen2_5_vl": (dict(family="qwen2_5_vl", patch_size=4, vision_layers=3, initializer_range=0.05), [1, 2, 3], True),
    # Qwen3-VL: Qwen3 decoder (q/k norms), interleaved M-RoPE, learned 4x4 vision position grid resampled to each
    # image, DeepStack from vision blocks 0 and 1 into decoder layers 0 and 1 (an exit at 1 cuts it short)
    # (q/k norms scaled up, x2 on average: the last prompt token's attention peaks at ~20x uniform)
    "qwen3_vl": (dict(family="qwen3_vl", patch_size=4, vision_layers=3, initializer_range=0.05), [1, 2, 3], True),
    # Gemma 3: 32 px SigLIP (patch 4) pooled to 16 tokens, layers [sliding, full, sliding, full] with window 8,
    # image tokens bidirectional, (1 + w) norms randomised, query_pre_attn_scalar 24 != head_dim
    "gemma3": (dict(family="gemma3", image_size=32, patch_size=4, initializer_range=0.1), [1, 2, 3], True),
}

#: Image sizes (W, H) that give each family several tile layouts and token counts.
IMAGE_SIZES = [(40, 52), (90, 40), (31, 70), (64, 64)]


def _build(name: str, root: Path) -> TinyModel:
    from dyvte.exporter import ExportSettings, export
    from dyvte.gates import save_gates
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    kwargs, candidates, with_gates = MODELS[name]
    if "words" in kwargs and kwargs["words"] is None:
        kwargs = dict(kwargs, words=_synth_words())
    spec = TinyLlavaSpec(**kwargs)
    model_dir = build_tiny_llava(spec, root / f"{name}-hf", seed=1)
    gates = gates_file = None
    if with_gates:
        # larger hidden states (Gemma: embeddings x sqrt(d), (1 + w) norms; Qwen3-VL: sharper q/k norms) need smaller
        # random gates to keep p(exit) spread over (0, 1)
        scale = {"gemma3": 0.1, "qwen3_vl": 0.5}.get(spec.family, 2.0)
        gates = make_gates(spec.num_layers, spec.hidden_size, scale=scale)
        gates_file = root / f"{name}-gates.safetensors"
        save_gates(gates_file, gates)
    engine_dir = root / f"{name}-engine"
    tiled = spec.family != "llava"  # room for two images per prompt (the default is one image's tiles)
    export(ExportSettings(out=engine_dir, model=str(model_dir), candidates=candidates, gates=gates_file,
                          max_input_len=256, max_new_tokens=32, max_tiles=12 if tiled else None, progress=False))
    return TinyModel(name, model_dir, engine_dir, spec, candidates, gates, gates_file)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    cache = {}

    def get(name: str) -> TinyModel:
        if name not in cache:
            cache[name] = _build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session", params=list(MODELS))
def tiny(request, tiny_models) -> TinyModel:
    return tiny_models(request.param)


@pytest.fixture(scope="session")
def llama(tiny_models) -> TinyModel:
    return tiny_models("llama_gqa")


@pytest.fixture(scope="session")
def synth_model(tiny_models) -> TinyModel:
    return tiny_models("synth")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """(data.json, image root) of 48 synthetic samples."""
    from dyvte.synth import write_dataset

    root = tmp_path_factory.mktemp("synth-data")
    return write_dataset(root, 48, seed=11, progress=False), root


@pytest.fixture(scope="session")
def pipelines():
    """Cache of loaded ONNX Runtime pipelines by engine folder."""
    from dyvte.runtime import Pipeline

    cache = {}

    def get(engine_dir) -> Pipeline:
        key = str(engine_dir)
        if key not in cache:
            cache[key] = Pipeline.load(engine_dir, backend="onnxruntime")
        return cache[key]

    return get


def copy_engine(src, tmp_path):
    """A private copy of an engine folder (for tests that edit or break it)."""
    dst = tmp_path / "engine"
    shutil.copytree(src, dst)
    return dst


def make_image(seed: int = 0, size=(40, 52)):
    """A random RGB image of ``size`` (W, H)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def encode_inputs(pipe, seed=0, prompt="what color is the circle ?"):
    """(input_ids [1,T], the processor's image tensors as numpy arrays) for one image and question."""
    from dyvte.runtime.inputs import encode

    ids, vision = encode(pipe.processor, make_image(seed, IMAGE_SIZES[seed % len(IMAGE_SIZES)]), prompt)
    return ids[None], {k: v.numpy() for k, v in vision.items()}


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "img.png"
    make_image(3).save(path)
    return path


class RecordingRunner:
    """Wraps a runner and records every segment call as (segment, mode, rows, new tokens,
    position ids as the graph gets them)."""

    def __init__(self, runner):
        self._runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
        self.calls.append((index, mode, hidden.shape[0], hidden.shape[1], position_ids.clone()))
        return self._runner.segment(index, hidden, position_ids, attention_mask, cache, mode, extra, scores)
