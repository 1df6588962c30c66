"""VTW calibration and the evaluation command on a tiny model with synthetic data."""

import json

import pytest
import torch

from conftest import copy_engine
from reference import forward_with_exit


@pytest.fixture
def engine(synth_model, tmp_path):
    return copy_engine(synth_model.engine_dir, tmp_path)


def test_vtw_kl_matches_reference_and_policy(engine, synth_model, synth_data):
    from dyvte.data import records_to_qa
    from dyvte.runtime import Pipeline
    from dyvte.runtime.inputs import encode
    from dyvte.synth import load_records
    from dyvte.vtw import calibrate_vtw

    data, root = synth_data
    res = calibrate_vtw(engine, data, root, samples=4, eta=1e9, backend="onnxruntime", progress=False)
    assert res["exit_layer"] == 1  # every candidate qualifies: the first one wins
    # independent KL(P_withdrawn || P_full) on the HF model
    pipe = Pipeline.load(engine, backend="onnxruntime")
    hf = synth_model.hf
    kl = {k: 0.0 for k in (1, 2, 3)}
    for s in records_to_qa(load_records(data), root, 4):
        ids, px = encode(pipe.processor, s.image, s.question)
        px = px["pixel_values"]
        emb_ids = ids[None]
        from reference import _merged_embeddings

        embeds, visual = _merged_embeddings(hf, emb_ids, px)
        with torch.no_grad():
            full = torch.log_softmax(forward_with_exit(hf, embeds, torch.arange(len(ids))[None], visual, 4).double(), -1)
            for k in kl:
                w = torch.log_softmax(forward_with_exit(hf, embeds, torch.arange(len(ids))[None], visual, k).double(), -1)
                kl[k] += float((w.exp() * (w - full)).sum()) / 4
    for k in kl:
        assert res["mean_kl"][str(k)] == pytest.approx(kl[k], rel=1e-3, abs=1e-6)
    assert pipe.manifest.calibration["vtw"]["exit_layer"] == 1
    a = pipe.generate(s.image, s.question, max_new_tokens=3, policy="vtw")
    b = pipe.generate(s.image, s.question, max_new_tokens=3, policy="layer:1")
    assert a.exit_layer == 1 and a.token_ids == b.token_ids
    # a threshold below every KL: no candidate qualifies -> L (no exit)
    res = calibrate_vtw(engine, data, root, samples=4, eta=min(kl.values()) / 2, backend="onnxruntime", progress=False)
    assert res["exit_layer"] == 4
    Pipeline.load(engine, backend="onnxruntime")  # the rewritten manifest still verifies


def test_eval_json_and_plots(engine, synth_data, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from dyvte.cli import main

    data, root = synth_data
    res = CliRunner().invoke(main, ["calibrate-vtw", "--engine-dir", str(engine), "--data", str(data), "--image-root",
                                    str(root), "--samples", "3", "--eta", "0.5", "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(main, ["eval", "--engine-dir", str(engine), "--data", str(data), "--image-root", str(root),
                                    "--max-samples", "12", "--json", str(out), "--plots", str(tmp_path / "plots"),
                                    "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert list(summary) == ["never", "gate", "vtw", "layer:0", "layer:1", "layer:2", "layer:3"]
    for pol, m in summary.items():
        assert 0 <= m["accuracy"] <= 1 and m["tflops"] > 0 and m["samples"] == 12
    assert summary["never"]["mean_exit_layer"] == 4 and summary["layer:2"]["mean_exit_layer"] == 2
    assert summary["layer:0"]["tflops"] < summary["layer:2"]["tflops"] < summary["never"]["tflops"]
    assert "never" in res.stdout and "decoder FLOPs" in res.stdout
    for name in ("accuracy_vs_exit_layer.png", "gate_exit_layers.png"):
        assert Image.open(tmp_path / "plots" / name).size[0] > 300


def test_eval_policy_errors(synth_model, synth_data):
    from dyvte.errors import PolicyError
    from dyvte.evaluate import evaluate

    data, root = synth_data
    with pytest.raises(PolicyError, match="calibrate-vtw"):
        evaluate(synth_model.engine_dir, data, root, ["vtw"], backend="onnxruntime", max_samples=2, progress=False)


def test_normalize():
    from dyvte.evaluate import normalize

    assert normalize(" The Red. ") == "red" and normalize("A cat!") == "cat" and normalize("two") == "two"
