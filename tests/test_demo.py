"""The embedded default: the trained demo LLaVA and its gates, exported without --model."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dyvte.cli import export_main, main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "demo.png"


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "engine"
    res = CliRunner().invoke(export_main, ["--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_default_export_is_the_trained_demo_with_gates(demo_engine):
    m = json.loads((demo_engine / "manifest.json").read_text())
    assert "demo" in m["model"]["source"]
    assert m["candidates"] == [1, 2, 3, 4, 5, 6, 7]  # every layer for L = 8
    assert m["gates"]["layers"] == m["candidates"]
    res = CliRunner().invoke(main, ["run", "--engine-dir", str(demo_engine), "--image", str(EXAMPLE),
                                    "--prompt", "what word is written in the image ?", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["text"] == "sun" and out["policy"] == "gate" and out["exit_layer"] < 8


def test_demo_uses_the_image_and_the_gate_saves_compute(demo_engine):
    from dyvte.evaluate import evaluate

    summary, _ = evaluate(demo_engine, max_samples=120, policies=["never", "gate", "layer:0"], progress=False)
    never, gate, blind = summary["never"], summary["gate"], summary["layer:0"]
    assert never["accuracy"] >= 0.9
    assert blind["accuracy"] < 0.45  # visual tokens dropped before layer 0: text-only guessing
    assert gate["accuracy"] >= never["accuracy"] - 0.03
    assert gate["mean_exit_layer"] < 6 and gate["decoder_tflops"] < 0.8 * never["decoder_tflops"]
