"""fp16/bf16 at deployment positions for Gemma 3 and Qwen3-VL, as tests/test_precision.py checks
LLaVA: a prompt whose image comes ~1,300 tokens in, attention far from uniform, each backend's error
against Hugging Face float32 within 3x (+ 0.2 % of the largest logit) of HF's own error in that
dtype. Gemma 3 here has a 256-token window (the text after the image sees it through the global
layers only) and its two RoPE tables; Qwen3-VL interleaved M-RoPE rows and DeepStack at those
positions."""

import numpy as np
import pytest
import torch

from reference import generate_with_exit

N_BEFORE, N_AFTER, EXIT = 1300, 30, 2  # the image at position ~1,300

SPECS = {"gemma3": dict(family="gemma3", image_size=32, patch_size=4, initializer_range=0.1, sliding_window=256,
                        max_position_embeddings=4096),
         "qwen3_vl": dict(family="qwen3_vl", patch_size=4, vision_layers=3, initializer_range=0.05,
                          max_position_embeddings=4096)}


@pytest.fixture(scope="module", params=list(SPECS))
def long_model(request, tmp_path_factory):
    """The family's tiny model exported in float32 and float16, HF in each dtype, and a 1,3xx-token
    prompt: random text, one image (its processor tensors), more text."""
    from dyvte.exporter import ExportSettings, export
    from dyvte.models import load_model
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    root = tmp_path_factory.mktemp(f"long-{request.param}")
    spec = TinyLlavaSpec(**SPECS[request.param])
    model_dir = build_tiny_llava(spec, root / "hf", seed=0)
    engines = {dt: export(ExportSettings(out=root / dt, model=str(model_dir), candidates=[1, 2, 3], dtype=dt,
                                         max_input_len=2048, max_new_tokens=16, progress=False))
               for dt in ("float32", "float16")}
    g = torch.Generator().manual_seed(0)
    vocab, image = len(spec.vocab), spec.image_token_id
    text = lambda n: torch.randint(12, vocab, (n,), generator=g)  # noqa: E731 (words, not special tokens)
    if spec.family == "gemma3":
        boi, eoi = spec.vocab.index("<start_of_image>"), spec.vocab.index("<end_of_image>")
        vis = torch.cat([torch.tensor([boi]), torch.full((spec.num_visual_tokens,), image), torch.tensor([eoi])])
        pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
        ids = torch.cat([torch.tensor([2]), text(N_BEFORE), vis, text(N_AFTER)])[None]
        vision = {"pixel_values": pixels, "token_type_ids": (ids == image).long()}
    else:
        start, end = spec.vocab.index("<|vision_start|>"), spec.vocab.index("<|vision_end|>")
        grid = [1, 8, 12]  # 24 visual tokens
        vis = torch.cat([torch.tensor([start]), torch.full((24,), image), torch.tensor([end])])
        ids = torch.cat([text(N_BEFORE), vis, text(N_AFTER)])[None]
        vision = {"pixel_values": torch.randn(96, 96, generator=g), "image_grid_thw": torch.tensor([grid]),
                  "mm_token_type_ids": (ids == image).long()}
    hf = {dt: load_model(model_dir, dt) for dt in ("float32", "float16", "bfloat16")}
    return engines, hf, ids, vision


def _hf_last_logits(model, ids, vision):
    kw = {k: v.to(model.dtype) if k == "pixel_values" else v for k, v in vision.items()}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0, -1].float()


def _bound(hf_err, ref):
    return 3 * hf_err + 2e-3 * float(ref.abs().max())


def _load(engines, backend, dtype):
    from dyvte.runtime import Pipeline

    if backend == "torch":  # the float32 folder run in low precision by the torch backend
        return Pipeline.load(engines["float32"], backend="torch", device="cpu", dtype=dtype)
    return Pipeline.load(engines[dtype], backend="onnxruntime")


@pytest.mark.parametrize("backend,dtype", [("onnxruntime", "float16"), ("torch", "bfloat16")])
def test_prefill_logits_at_long_positions(long_model, backend, dtype):
    engines, hf, ids, vision = long_model
    ref = _hf_last_logits(hf["float32"], ids, vision)
    hf_err = float((_hf_last_logits(hf[dtype], ids, vision) - ref).abs().max())
    with _load(engines, backend, dtype) as pipe:
        res = pipe.generate_ids(ids.numpy(), **{k: v.numpy() for k, v in vision.items()}, max_new_tokens=1,
                                policy="never", return_logits=True)
    err = float(np.abs(res.logits[0] - ref.numpy()).max())
    assert err <= _bound(hf_err, ref), f"{backend} {dtype}: error {err:.4g} vs HF {dtype} {hf_err:.4g}"


@torch.no_grad()
def _forced_exit_logits(model, ids, vision, tokens):
    """Logits of each step of ``tokens`` (teacher-forced) with the exit at EXIT, by the reference."""
    kw = {k: v.to(model.dtype) if k == "pixel_values" else v for k, v in vision.items()}
    out = []
    for n in range(len(tokens)):
        seq = torch.cat([ids, torch.tensor([tokens[:n]], dtype=ids.dtype)], 1)
        _, logits = generate_with_exit(model, seq, kw, EXIT, 1, prompt_len=ids.shape[1])
        out.append(logits[0].float())
    return torch.stack(out)


def test_decode_after_exit_at_long_positions(long_model):
    """torch float16 (from the float32 folder): 2 tokens after an exit at layer 2."""
    engines, hf, ids, vision = long_model
    with _load(engines, "torch", "float16") as pipe:
        res = pipe.generate_ids(ids.numpy(), **{k: v.numpy() for k, v in vision.items()}, max_new_tokens=2,
                                policy=f"layer:{EXIT}", return_logits=True)
    assert res.exit_layer == EXIT and len(res.token_ids) == 2
    ref = _forced_exit_logits(hf["float32"], ids, vision, res.token_ids)
    hf_err = float((_forced_exit_logits(hf["float16"], ids, vision, res.token_ids) - ref).abs().max())
    err = float(np.abs(res.logits - ref.numpy()).max())
    assert err <= _bound(hf_err, ref), f"torch float16: error {err:.4g} vs HF float16 {hf_err:.4g}"
