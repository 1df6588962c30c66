"""fp16/bf16 numerics at deployment positions: a model whose attention is far from uniform and a
prompt whose text starts ~1,800 tokens in, against Hugging Face float32.

Each backend's error in a low-precision dtype must stay within 3x (+ a small epsilon) of the
error Hugging Face itself makes in that dtype. Rounding the RoPE frequencies to fp16 (the bug this
guards against) made it 7-10x on this model.
"""

import numpy as np
import pytest
import torch

from reference import generate_with_exit

N_BEFORE, N_AFTER, EXIT = 1800, 30, 2  # text tokens before / after the image, exit layer of the decode test


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A 4-layer LLaVA with 4,096 positions, large random weights (init 0.2: peaked attention),
    exported in float32, float16 and bfloat16, and a 1,856-token prompt."""
    from dyvte.exporter import ExportSettings, export
    from dyvte.models import load_model
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    root = tmp_path_factory.mktemp("long")
    spec = TinyLlavaSpec(max_position_embeddings=4096, initializer_range=0.2)
    model_dir = build_tiny_llava(spec, root / "hf", seed=0)
    engines = {dt: export(ExportSettings(out=root / dt, model=str(model_dir), candidates=[1, 2, 3], dtype=dt,
                                         max_input_len=2048, max_new_tokens=64, progress=False))
               for dt in ("float32", "float16", "bfloat16")}
    g = torch.Generator().manual_seed(0)
    vocab = len(spec.vocab)
    ids = torch.cat([torch.tensor([2]), torch.randint(5, vocab, (N_BEFORE,), generator=g),
                     torch.full((spec.num_visual_tokens,), 4), torch.randint(5, vocab, (N_AFTER,), generator=g)])[None]
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    hf = {dt: load_model(model_dir, dt) for dt in ("float32", "float16", "bfloat16")}
    return engines, hf, ids, pixels


def _hf_last_logits(model, ids, pixels):
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels.to(model.dtype), attention_mask=torch.ones_like(ids))
    return out.logits[0, -1].float()


def _bound(hf_err, ref):
    return 3 * hf_err + 2e-3 * float(ref.abs().max())


def test_attention_is_not_uniform(long_model):
    """Sanity: the model's attention is peaked, so position errors change its outputs."""
    _, hf, ids, pixels = long_model
    with torch.no_grad():
        out = hf["float32"](input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), output_attentions=True)
    last_row = torch.stack([a[0, :, -1] for a in out.attentions])  # [layers, heads, T]
    assert float(last_row.max(-1).values.mean()) > 100 / ids.shape[1]  # uniform would be 1 / T


@pytest.mark.parametrize("backend,dtype", [("torch", "float16"), ("torch", "bfloat16"), ("onnxruntime", "float16"),
                                           ("torch-bf16-folder", "bfloat16")])
def test_prefill_logits_at_long_positions(long_model, backend, dtype):
    from dyvte.runtime import Pipeline

    engines, hf, ids, pixels = long_model
    ref = _hf_last_logits(hf["float32"], ids, pixels)
    hf_err = float((_hf_last_logits(hf[dtype], ids, pixels) - ref).abs().max())
    if backend == "torch":  # the float32 folder run in low precision by the torch backend
        pipe = Pipeline.load(engines["float32"], backend="torch", device="cpu", dtype=dtype)
    elif backend == "onnxruntime":
        pipe = Pipeline.load(engines[dtype], backend="onnxruntime")
    else:  # a bfloat16 export: validated through the torch backend, run by it ("auto" on a CPU)
        pipe = Pipeline.load(engines[dtype], backend="auto")
        assert pipe.backend == "torch"
    res = pipe.generate_ids(ids.numpy(), pixels.numpy(), max_new_tokens=1, policy="never", return_logits=True)
    err = float(np.abs(res.logits[0] - ref.numpy()).max())
    assert err <= _bound(hf_err, ref), f"{backend} {dtype}: error {err:.4g} vs HF {dtype} {hf_err:.4g}"


@torch.no_grad()
def _forced_exit_logits(model, ids, pixels, tokens):
    """Logits of each step of ``tokens`` (teacher-forced) with the exit at EXIT, by the reference."""
    out = []
    for n in range(len(tokens)):
        seq = torch.cat([ids, torch.tensor([tokens[:n]], dtype=ids.dtype)], 1)
        _, logits = generate_with_exit(model, seq, pixels.to(model.dtype), EXIT, 1, prompt_len=ids.shape[1])
        out.append(logits[0].float())
    return torch.stack(out)


@pytest.mark.parametrize("backend,dtype", [("torch", "float16"), ("torch", "bfloat16"), ("onnxruntime", "float16")])
def test_decode_after_exit_at_long_positions(long_model, backend, dtype):
    from dyvte.runtime import Pipeline

    engines, hf, ids, pixels = long_model
    folder = engines["float32"] if backend == "torch" else engines[dtype]
    kw = dict(device="cpu", dtype=dtype) if backend == "torch" else {}
    pipe = Pipeline.load(folder, backend=backend, **kw)
    res = pipe.generate_ids(ids.numpy(), pixels.numpy(), max_new_tokens=4, policy=f"layer:{EXIT}", return_logits=True)
    assert res.exit_layer == EXIT and len(res.token_ids) == 4
    ref = _forced_exit_logits(hf["float32"], ids, pixels, res.token_ids)
    hf_err = float((_forced_exit_logits(hf[dtype], ids, pixels, res.token_ids) - ref).abs().max())
    err = float(np.abs(res.logits - ref.numpy()).max())
    assert err <= _bound(hf_err, ref), f"{backend} {dtype}: error {err:.4g} vs HF {dtype} {hf_err:.4g}"


def test_bfloat16_folder_on_onnxruntime_is_a_clear_error(long_model):
    from dyvte.errors import BackendUnavailableError
    from dyvte.runtime import Pipeline

    engines = long_model[0]
    with pytest.raises(BackendUnavailableError, match="bfloat16.*backend='torch'.*'tensorrt'"):
        Pipeline.load(engines["bfloat16"], backend="onnxruntime")


def test_export_validation_catches_rounded_rope_at_long_positions(llama, tmp_path, monkeypatch):
    """Validation runs each segment at the folder's largest position: frequencies rounded to
    fp16 pass the short cases of an fp16 export (within its tolerance) but fail there."""
    import dyvte.exporter.export_model as em
    from dyvte.errors import ValidationError
    from dyvte.exporter import ExportSettings, export

    real = em.hf.segment_from_hf

    def rounded(*args):
        seg = real(*args)
        seg.inv_freq = seg.inv_freq.half().float()  # the old bug, in float32 storage
        return seg

    monkeypatch.setattr(em.hf, "segment_from_hf", rounded)
    with pytest.raises(ValidationError, match=r"segment_0 \(long"):
        export(ExportSettings(out=tmp_path / "e", model=str(llama.model_dir), candidates=[2], dtype="float16", max_input_len=1900,
                              max_new_tokens=100, progress=False))
