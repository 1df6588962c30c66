"""Quantized engine folders (--quantize int8|int4): graphs, manifest, validation, exit semantics,
refusals; fused segment graphs; the ONNX Runtime backend's device choice."""

import json

import numpy as np
import pytest
import torch

from conftest import make_image
from dyvte.errors import BackendUnavailableError, InputError

SCHEMES = {"int8": "llama_gqa", "int4": "qwen2_vl"}  # 1-D RoPE and M-RoPE


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """{scheme: (tiny model, quantized engine folder)} (with gates)."""
    from dyvte.exporter import ExportSettings, export

    out = {}
    for scheme, name in SCHEMES.items():
        model = tiny_models(name)
        engine = tmp_path_factory.mktemp(f"q-{scheme}") / "engine"
        export(ExportSettings(out=engine, model=str(model.model_dir), candidates=model.candidates,
                              gates=model.gates_file, quantize=scheme, max_input_len=256, max_new_tokens=32,
                              max_tiles=12 if model.spec.family != "llava" else None, progress=False))
        out[scheme] = (model, engine)
    return out


def _ops(path):
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    float_weights = [n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    return {n.op_type for n in m.graph.node}, float_weights


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_graphs_manifest_and_inspect(quantized, scheme):
    from click.testing import CliRunner

    from dyvte.cli import main
    from dyvte.engines.manifest import Manifest

    model, engine = quantized[scheme]
    m = Manifest.load(engine)
    assert m.quantization["name"] == scheme and m.quantization["parts"] == ["segment", "head"]
    op = "MatMulNBits"
    for name, part in m.parts.items():
        ops, float_weights = _ops(m.path(part.onnx))
        if part.kind in ("segment", "head"):
            assert part.quantized == scheme and op in ops and not float_weights, name
            assert part.graph == ("fused" if part.kind == "segment" else "plain")
        else:  # vision, embed, gate stay float
            assert part.quantized is None and "MatMulNBits" not in ops, name
    float_m = Manifest.load(model.engine_dir, verify=False)

    def weight_bytes(man):
        return sum(meta["size"] for rel, meta in man.data["files"].items() if rel.startswith("onnx/segment_") and rel.endswith(".data"))

    ratio = weight_bytes(m) / weight_bytes(float_m)
    assert ratio < {"int8": 0.35, "int4": 0.3}[scheme], ratio  # tiny layers: norms and scales weigh more
    check = m.data["validation"]["quantized"]
    assert check["scheme"] == scheme and check["tokens"] > 0, check
    assert check["greedy_agreement"] >= {"int8": 0.9, "int4": 0.5}[scheme], check  # tiny random models: near-ties
    assert 0 < check["logit_rel_err"] < 0.5
    out = CliRunner().invoke(main, ["inspect", str(engine)])
    assert out.exit_code == 0 and scheme in out.output and "greedy-token agreement" in out.output
    assert m.data["lint"]["tensorrt"] is None  # quantized folders are not TensorRT inputs


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_exit_semantics_are_kept(quantized, scheme):
    """In a quantized folder a batch row equals its single run, layer:K exits at K (and K changes
    the answer), gate decisions are taken, and rows joining/leaving a running batch answer as alone."""
    from dyvte.runtime import Pipeline

    from test_scheduler import _requests, _run_staggered

    model, engine = quantized[scheme]
    with Pipeline.load(engine) as pipe:  # auto -> onnxruntime
        assert pipe.backend == "onnxruntime" and set(pipe.runner.segment_graphs) == {"fused"}
        images = [make_image(s) for s in range(4)]
        prompts = ["what color is the circle ?", "how many red squares are there ?", "is there a blue triangle ?",
                   "what shape ?"]
        for policy in ("gate", f"layer:{model.candidates[0]}"):
            batch = pipe.generate(images, prompts, max_new_tokens=5, policy=policy, gate_threshold=0.5,
                                  return_logits=True)
            for b, i, p in zip(batch, images, prompts):
                alone = pipe.generate(i, p, max_new_tokens=5, policy=policy, gate_threshold=0.5, return_logits=True)
                assert (b.exit_layer, b.token_ids) == (alone.exit_layer, alone.token_ids)
                np.testing.assert_allclose(b.logits, alone.logits, atol=1e-4, rtol=0)
        L = model.spec.num_layers
        logits = {}
        for k in (0, model.candidates[-1], L):
            res = pipe.generate(images[0], prompts[0], max_new_tokens=1, policy=f"layer:{k}", return_logits=True)
            assert res.exit_layer == k
            logits[k] = res.logits
        assert np.abs(logits[0] - logits[L]).max() > 1e-3
        gated = pipe.generate(images[1], prompts[1], max_new_tokens=2, policy="gate", gate_threshold=0.0)
        assert gated.exit_layer == model.candidates[0] and gated.gate_probs
        reqs = _requests(pipe, 6)
        alone = [pipe.run([r])[0] for r in reqs]
        results, sizes, _ = _run_staggered(pipe, reqs, [0, 0, 1, 1, 2, 3], prefill_tokens=16)
        assert max(sizes) >= 2
        for got, want in zip(results, alone):
            assert (got.token_ids, got.exit_layer) == (want.token_ids, want.exit_layer)


def test_backends_on_a_quantized_folder(quantized):
    from dyvte.runtime import Pipeline

    _, engine = quantized["int8"]
    with pytest.raises(BackendUnavailableError, match="int8 weights.*backend='onnxruntime'"):
        Pipeline.load(engine, backend="torch", device="cpu")
    from dyvte.engines.lint import lint_folder
    from dyvte.engines.manifest import Manifest

    assert not lint_folder(Manifest.load(engine)).ok  # com.microsoft ops: no TensorRT input


def test_bad_quantize_options(llama, tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import main
    from dyvte.exporter import ExportSettings, export

    base = dict(out=tmp_path / "e", model=str(llama.model_dir), progress=False)
    cases = [(dict(quantize="int8", dtype="float16"), "needs --dtype float32"),
             (dict(quantize="int4", dtype="bfloat16"), "needs --dtype float32"),
             (dict(block_size=32), "apply to --quantize"),
             (dict(quantize="int4", block_size=24), "power of two"),
             (dict(quantize="int4", accuracy_level=7), "0-4"),
             (dict(quantize="int3"), "not one of"),
             (dict(dtype="bfloat16", fused=True), "no bfloat16 kernels")]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            export(ExportSettings(**base, **kwargs))
    assert not (tmp_path / "e").exists()
    res = CliRunner().invoke(main, ["export", "--model", str(llama.model_dir), "--out", str(tmp_path / "c"),
                                    "--quantize", "int4", "--dtype", "float16"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "needs --dtype float32" in res.output
    res = CliRunner().invoke(main, ["export", "--model", str(llama.model_dir), "--out", str(tmp_path / "c"),
                                    "--quantize", "int8", "--engines", "tensorrt"])
    assert res.exit_code != 0 and "dyvte build --quantize" in res.output


# -- fused float graphs ------------------------------------------------------------------------------

def test_fused_graphs_share_the_weights(llama):
    import onnx

    from dyvte.engines.manifest import Manifest

    m = Manifest.load(llama.engine_dir)
    for part in m.segments:
        fused = part.variant("fused")
        assert fused is not None and fused.onnx.endswith(".fused.onnx")
        g = onnx.load(m.path(fused.onnx), load_external_data=False)
        ops = {n.op_type for n in g.graph.node}
        assert "GroupQueryAttention" in ops and "Softmax" not in ops
        locations = {e.value for i in g.graph.initializer for e in i.external_data if e.key == "location"}
        assert locations == {part.onnx.split("/")[-1] + ".data"}  # the plain graph's weights file, nothing of its own
        assert m.path(fused.onnx).stat().st_size < m.path(part.onnx + ".data").stat().st_size
        cap = [i for i in fused.inputs if i["name"].startswith("past.")][0]["shape"]
        assert cap[2] == "capacity"


def test_fused_and_plain_runners_agree(llama):
    """Every way of calling a segment (prefill, decode, a cached batch continuing with several new
    tokens: GQA runs that row by row) gives the plain graph's numbers."""
    from dyvte.engines.manifest import Manifest
    from dyvte.runtime.backends.onnxruntime import OnnxRuntimeRunner

    m = Manifest.load(llama.engine_dir)
    fused, plain = OnnxRuntimeRunner(m), OnnxRuntimeRunner(m, graphs="plain")
    assert set(fused.segment_graphs) == {"fused"} and set(plain.segment_graphs) == {"plain"}
    g = torch.Generator().manual_seed(0)
    d = llama.spec.hidden_size
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    caches = [r.new_cache(1, 2, 16) for r in (fused, plain)]
    steps = [(6, mask, True), (1, torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], 1), False),
             (3, torch.cat([mask, torch.ones(2, 4, dtype=torch.int64)], 1), True)]
    for S, am, scores in steps:
        h = torch.randn(2, S, d, generator=g)
        T = am.shape[1]
        pos = (am.cumsum(1) - 1).clamp(min=0)[:, T - S:]
        outs = [r.segment(1, h, pos, am, c, "full", scores=scores) for r, c in zip((fused, plain), caches)]
        if scores:
            (hf, sf), (hp, sp) = outs
            np.testing.assert_allclose(sf[am.bool()], sp[am.bool()], atol=1e-5)
        else:
            hf, hp = outs
        rows = am[:, -S:].bool()
        np.testing.assert_allclose(hf[rows], hp[rows], atol=1e-5)
    assert caches[0].length == caches[1].length == 10
    keys = am.bool()  # [2,10]: the last step's mask covers every cached slot
    for (kf, vf), (kp, vp) in zip(caches[0].kv, caches[1].kv):
        np.testing.assert_allclose(kf[:, :, :10].transpose(1, 2)[keys], kp.transpose(1, 2)[keys], atol=1e-6)
        np.testing.assert_allclose(vf[:, :, :10].transpose(1, 2)[keys], vp.transpose(1, 2)[keys], atol=1e-6)
    assert fused.cache_nbytes(caches[0]) == 2 * 2 * 16 * llama.spec.num_kv_heads * (d // llama.spec.num_heads) * 4


# -- device choice --------------------------------------------------------------------------------------

def test_device_choice_and_errors(monkeypatch):
    import onnxruntime as ort

    from dyvte.runtime.backends import onnxruntime as backend

    assert backend.resolve_device(None).type == "cpu" and backend.resolve_device("cpu").type == "cpu"
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # this machine's CPU package
        with pytest.raises(BackendUnavailableError, match="CPU package.*onnxruntime-gpu"):
            backend.resolve_device("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.resolve_device(None).type == "cpu"  # the GPU package lists CUDA even without a GPU
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
        backend.resolve_device("cuda:0")
    with pytest.raises(BackendUnavailableError, match="cpu or cuda"):
        backend.resolve_device("mps")
    monkeypatch.setattr(backend, "installed_packages", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BackendUnavailableError, match="both onnxruntime and onnxruntime-gpu"):
        backend.import_onnxruntime()


def test_manifest_records_the_graphs(llama):
    data = json.loads((llama.engine_dir / "manifest.json").read_text())
    seg = data["parts"]["segment_0"]
    assert seg["info"].get("graph", "plain") == "plain" and "fused" in seg["graphs"]
    assert data["validation"]["segment_0"]["fused_max_abs_err"] < 1e-4
    assert data["quantization"] is None


# -- TensorRT: ModelOpt Q/DQ graphs --------------------------------------------------------------------

def test_modelopt_qdq_graphs_and_calibration(llama, tmp_path):
    """The calibration inputs are each part's real prefill feeds (the plain graph runs on them), and
    the ModelOpt command per part is the documented CLI; Q/DQ graphs are reused when unchanged."""
    from types import SimpleNamespace

    from conftest import copy_engine
    from dyvte.engines.manifest import Manifest
    from dyvte.engines.modelopt import qdq_graphs
    from dyvte.runtime.backends.onnxruntime import create_session

    m = Manifest.load(copy_engine(llama.engine_dir, tmp_path))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = cmd[cmd.index("--output_path") + 1]
        with open(out, "wb") as f:
            f.write(b"qdq")
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    python = tmp_path / "python"
    python.write_text("")
    got = qdq_graphs(m, "int8", str(python), samples=3, run=fake_run)
    wanted = {p.name for p in m.segments} | {"head"}
    assert set(got) == wanted and len(calls) == len(wanted)
    for cmd in calls:
        assert cmd[:3] == [str(python), "-m", "modelopt.onnx.quantization"]
        assert cmd[cmd.index("--quantize_mode") + 1] == "int8" and cmd[cmd.index("--high_precision_dtype") + 1] == "fp32"
    for name in wanted:
        calib = dict(np.load(m.root / "trt" / "qdq" / f"{name}.calib.npz"))
        part = m.parts[name]
        assert set(calib) == {i["name"] for i in part.inputs}
        assert calib["hidden_states"].shape[0] == 3  # the calibration prompts, one batch
        create_session(m.path(part.onnx)).run(None, calib)  # valid feeds of the plain graph
    calls.clear()
    assert qdq_graphs(m, "int8", str(python), samples=3, run=fake_run) == got and not calls  # resumed
    qdq_graphs(m, "int4", str(python), run=fake_run)
    assert all("--calibration_data_path" not in c and c[c.index("--calibration_method") + 1] == "rtn_dq" for c in calls)
    with pytest.raises(BackendUnavailableError, match="setup.sh --modelopt"):
        qdq_graphs(m, "fp8", str(tmp_path / "missing"), run=fake_run)
    with pytest.raises(InputError, match="not one of"):
        qdq_graphs(m, "int2", str(python), run=fake_run)
