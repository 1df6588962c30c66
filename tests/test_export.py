"""Exporter: folder contents, validation, resume after interruption, model resolution."""

import json
import shutil
from pathlib import Path

import pytest

from dyvte.errors import InputError, ModelNotFoundError
from dyvte.exporter import ExportSettings, export


def test_folder_contents(tiny):
    from dyvte.engines.manifest import Manifest

    m = Manifest.load(tiny.engine_dir)
    assert m.candidates == tiny.candidates
    assert [p.layers for p in m.segments] == list(zip([0, *tiny.candidates], [*tiny.candidates, tiny.spec.num_layers]))
    assert m.gate_layers == tiny.candidates
    assert set(m.parts) == {"vision", "embed", "head", "gate", *(p.name for p in m.segments)}
    for name, v in m.data["validation"].items():
        assert v["max_abs_err"] is not None and v["max_abs_err"] < 1e-4, name
    assert m.model["family"] == tiny.spec.family and m.model["vision"]["tokens_per_tile"] == tiny.spec.num_visual_tokens
    assert (tiny.engine_dir / "gates.safetensors").is_file()
    assert not (tiny.engine_dir.parent / (tiny.engine_dir.name + ".partial")).exists()
    seg = m.segments[0]
    names = [i["name"] for i in seg.inputs]
    assert names[:3] == ["hidden_states", "position_ids", "attention_mask"]
    first = names.index("past.0.key")  # after the family's inputs (key_positions, token_groups, deepstack)
    assert set(names[3:first]) <= {"key_positions", "token_groups", "deepstack"}
    assert names[first: first + 2] == ["past.0.key", "past.0.value"]
    assert seg.inputs[first]["shape"] == ["batch", tiny.spec.num_kv_heads, "past",
                                          tiny.spec.hidden_size // tiny.spec.num_heads]


def test_segments_have_no_control_flow(llama):
    import onnx

    for f in (llama.engine_dir / "onnx").glob("segment_*.onnx"):
        if f.name.endswith(".fused.onnx"):  # ONNX Runtime's graphs (tests/test_quantize.py); these are TensorRT's
            continue
        ops = {n.op_type for n in onnx.load(f, load_external_data=False).graph.node}
        assert not ops & {"If", "Loop", "Scan", "Attention"}, f.name
        assert {"MatMul", "Softmax", "Concat"} <= ops


class Interrupt(Exception):
    pass


def test_interrupted_export_resumes(llama, tmp_path, monkeypatch):
    import dyvte.exporter.export_model as em

    out = tmp_path / "eng"
    real = em.validate
    calls = []

    def flaky(part, *args, **kwargs):
        calls.append(part.name)
        if part.name == "segment_2":
            raise Interrupt()
        return real(part, *args, **kwargs)

    monkeypatch.setattr(em, "validate", flaky)
    settings = dict(model=str(llama.model_dir), candidates=[1, 2, 3], gates=llama.gates_file, progress=False)
    with pytest.raises(Interrupt):
        export(ExportSettings(out=out, **settings))
    assert not out.exists(), "an interrupted export must not leave a folder at --out"
    staging = tmp_path / "eng.partial"
    assert (staging / "export-state.json").is_file()

    logs, calls[:] = [], []
    monkeypatch.setattr(em, "validate", lambda part, *a, **k: calls.append(part.name) or real(part, *a, **k))
    export(ExportSettings(out=out, log=logs.append, **settings))
    assert any("resuming" in line and "4 of 8" in line for line in logs), logs
    assert list(dict.fromkeys(calls)) == ["segment_2", "segment_3", "gate", "head"]  # segments: plain + fused
    assert not staging.exists()
    assert (out / "manifest.json").is_file()

    # the resumed folder answers like the uninterrupted one
    from conftest import make_image
    from dyvte.runtime import Pipeline

    a = Pipeline.load(out, backend="onnxruntime").generate(make_image(1), "what color ?", max_new_tokens=4, policy="layer:2")
    b = Pipeline.load(llama.engine_dir, backend="onnxruntime").generate(make_image(1), "what color ?", max_new_tokens=4,
                                                                      policy="layer:2")
    assert a.token_ids == b.token_ids


def test_resume_redoes_changed_parts_and_corrupted_files(llama, tmp_path, monkeypatch):
    import dyvte.exporter.export_model as em

    out = tmp_path / "eng"
    staging = tmp_path / "eng.partial"
    real = em.validate
    calls = []

    def stop_at_head(part, *a, **k):
        calls.append(part.name)
        if part.name == "head":
            raise Interrupt()
        return real(part, *a, **k)

    monkeypatch.setattr(em, "validate", stop_at_head)
    with pytest.raises(Interrupt):
        export(ExportSettings(out=out, model=str(llama.model_dir), candidates=[1, 2], progress=False))
    # corrupt a finished part, then change the candidates: segment_1 [1,2) is unchanged and reused,
    # segment_0 is corrupted and redone, segment_2 changes range
    data = staging / "onnx" / "segment_0.onnx.data"
    data.write_bytes(b"\0" * data.stat().st_size)
    calls[:] = []
    monkeypatch.setattr(em, "validate", lambda part, *a, **k: calls.append(part.name) or real(part, *a, **k))
    export(ExportSettings(out=out, model=str(llama.model_dir), candidates=[1, 2, 3], progress=False))
    assert list(dict.fromkeys(calls)) == ["segment_0", "segment_2", "segment_3", "head"]  # segments: plain + fused
    assert sorted(p.name for p in (out / "onnx").glob("segment_*.onnx")) == sorted(
        f"segment_{i}{ext}" for i in range(4) for ext in (".onnx", ".fused.onnx"))


def test_overwrite_rules(llama, tmp_path):
    out = tmp_path / "eng"
    settings = dict(model=str(llama.model_dir), candidates=[2], progress=False, validate=False)
    export(ExportSettings(out=out, **settings))
    with pytest.raises(InputError, match="--overwrite"):
        export(ExportSettings(out=out, **settings))
    export(ExportSettings(out=out, overwrite=True, **{**settings, "candidates": [1, 3]}))
    assert json.loads((out / "manifest.json").read_text())["candidates"] == [1, 3]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a dyvte engine folder"):
        export(ExportSettings(out=other, overwrite=True, **settings))
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("candidates,match", [([0, 2], "outside"), ([2, 4], "outside"), ([-1], "outside")])
def test_bad_candidates(llama, tmp_path, candidates, match):
    with pytest.raises(InputError, match=match):
        export(ExportSettings(out=tmp_path / "e", model=str(llama.model_dir), candidates=candidates, progress=False))
    assert not (tmp_path / "e").exists()


def test_gates_file_errors(llama, tmp_path):
    import torch

    from dyvte.gates import save_gates

    settings = dict(out=tmp_path / "e", model=str(llama.model_dir), candidates=[1, 2, 3], progress=False)
    with pytest.raises(InputError, match="not found"):
        export(ExportSettings(gates=tmp_path / "missing.safetensors", **settings))
    partial = tmp_path / "partial.safetensors"
    save_gates(partial, {k: v for k, v in llama.gates.items() if k != 3})
    with pytest.raises(InputError, match=r"no gate for candidate layer\(s\) \[3\]"):
        export(ExportSettings(gates=partial, **settings))
    wrong = tmp_path / "wrong.safetensors"
    save_gates(wrong, {k: (torch.zeros(8, 10), torch.zeros(2, 8)) for k in (1, 2, 3)})
    with pytest.raises(InputError, match="another model"):
        export(ExportSettings(gates=wrong, **settings))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable safetensors"):
        export(ExportSettings(gates=junk, **settings))


def test_gate_hidden_sizes_may_differ(llama, tmp_path):
    """Gates with different hidden widths stack exactly (zero padding)."""
    import torch

    from conftest import make_image
    from dyvte.gates import save_gates
    from dyvte.runtime import Pipeline
    from reference import gate_exit

    g = torch.Generator().manual_seed(5)
    gates = {k: (torch.randn(h, 128, generator=g) * 2, torch.randn(2, h, generator=g) * 2) for k, h in ((1, 8), (2, 16), (3, 4))}
    path = tmp_path / "g.safetensors"
    save_gates(path, gates)
    out = export(ExportSettings(out=tmp_path / "e", model=str(llama.model_dir), candidates=[1, 2, 3], gates=path,
                                progress=False))
    pipe = Pipeline.load(out, backend="onnxruntime")
    from dyvte.runtime.inputs import encode

    ids, vision = encode(pipe.processor, make_image(0), "what color ?")
    pixels = vision["pixel_values"]
    _, probs = gate_exit(llama.hf, gates, [1, 2, 3], ids[None], pixels, threshold=1.1)
    res = pipe.generate_ids(ids[None].numpy(), pixels.numpy(), max_new_tokens=1, policy="gate", gate_threshold=1.0)
    for k in (1, 2, 3):
        assert res.gate_probs[k] == pytest.approx(probs[k], abs=1e-5)


def test_model_not_found_messages(tmp_path, monkeypatch):
    from dyvte.models import locate_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match="hf download llava-hf/llava-1.5-7b-hf"):
        locate_model("llava-7b")
    with pytest.raises(ModelNotFoundError, match="not found"):
        locate_model(str(tmp_path / "no" / "such" / "dir"))
    empty = tmp_path / "emptymodel"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        locate_model(empty)


def test_pickled_weights_refused(llama, tmp_path):
    from dyvte.models import locate_model

    d = tmp_path / "binmodel"
    d.mkdir()
    shutil.copy(llama.model_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFoundError, match="never loads"):
        locate_model(d)


def _fake_hf_cache(cache: Path, repo: str, files_from: Path) -> Path:
    """Lay out a Hugging Face hub cache entry (as `hf download` leaves it) holding local files."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    return snap


def test_preset_resolves_through_hf_cache(llama, tmp_path, monkeypatch):
    """`--model llava-7b` finds llava-hf/llava-1.5-7b-hf in the HF cache (here: a tiny model)."""
    import huggingface_hub.constants as c

    from dyvte.models import locate_model

    cache = tmp_path / "hub"
    snap = _fake_hf_cache(cache, "llava-hf/llava-1.5-7b-hf", llama.model_dir)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert locate_model("llava-7b") == snap
    assert locate_model("llava-hf/llava-1.5-7b-hf") == snap
    out = export(ExportSettings(out=tmp_path / "e", model="llava-7b", candidates=[2], progress=False, validate=False))
    assert json.loads((out / "manifest.json").read_text())["model"]["source"] == "llava-7b"


def test_unsupported_models(tmp_path):
    from dyvte.errors import UnsupportedModelError
    from dyvte.models import load_config

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        load_config(d)
