"""TensorRT-compatibility lint (CPU) and the profiler (ONNX Runtime here)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from conftest import copy_engine
from dyvte.cli import main


@pytest.fixture
def engine(llama, tmp_path):
    return copy_engine(llama.engine_dir, tmp_path)


def _lint(engine, *args):
    return CliRunner().invoke(main, ["lint", str(engine), *args])


def test_clean_folder_passes(llama):
    res = _lint(llama.engine_dir)
    assert res.exit_code == 0, res.output
    assert "0 error(s)" in res.stdout and "ONNX-TensorRT 10.1" in res.stdout
    assert json.loads(_lint(llama.engine_dir, "--json").stdout)["ok"] is True
    m = json.loads((llama.engine_dir / "manifest.json").read_text())
    assert m["lint"] == {"tensorrt": "10", "errors": 0, "warnings": 0}  # run by the export


def _edit(path, fn):
    model = onnx.load(path, load_external_data=False)
    fn(model)
    onnx.save(model, path)


def test_unsupported_operator_and_control_flow(engine):
    seg = engine / "onnx" / "segment_1.onnx"

    def add_nodes(model):
        g = model.graph
        g.node.append(onnx.helper.make_node("BitShift", ["attention_mask", "attention_mask"], ["nz"], direction="LEFT"))
        g.node.append(onnx.helper.make_node("Loop", ["", ""], ["lp"], body=onnx.helper.make_graph([], "b", [], [])))
        g.node.append(onnx.helper.make_node("Foo", ["nz"], ["foo"], domain="com.microsoft"))

    _edit(seg, add_nodes)
    res = _lint(engine)
    assert res.exit_code == 1
    out = res.stdout
    assert "operator BitShift is not supported" in out
    assert "control flow (Loop) in a decoder segment" in out
    assert "custom domain 'com.microsoft'" in out


def test_opset_and_types(engine):
    head = engine / "onnx" / "head.onnx"

    def bump(model):
        model.opset_import[0].version = 22

    _edit(head, bump)
    res = _lint(engine)
    assert res.exit_code == 1 and "opset 22 is outside TensorRT 10's range 9-20" in res.stdout
    assert _lint(engine, "--trt-version", "11").exit_code == 0  # 11.x parses opsets up to 24

    def double(model):
        g = model.graph
        g.node.append(onnx.helper.make_node("Cast", ["logits"], ["as_double"], to=onnx.TensorProto.DOUBLE))
        g.node.append(onnx.helper.make_node("Softmax", ["as_double"], ["sm"]))

    _edit(head, double)
    res = _lint(engine, "--trt-version", "11")
    assert res.exit_code == 1 and "Softmax with DOUBLE output is not supported" in res.stdout


def test_manifest_io_and_profiles(engine):
    mpath = engine / "manifest.json"
    data = json.loads(mpath.read_text())
    data["parts"]["embed"]["inputs"][0]["name"] = "token_ids"
    data["limits"]["max_input_len"] = 10  # fewer than the visual tokens: no room for text
    mpath.write_text(json.dumps(data))
    res = _lint(engine)
    assert res.exit_code == 1
    assert "manifest names token_ids, which the graph does not have" in res.stdout
    assert "leaves no room for text" in res.stdout


def test_fp16_export_keeps_softmax_and_norm_in_float32(llama, tmp_path):
    from dyvte.engines.lint import lint_folder
    from dyvte.engines.manifest import Manifest
    from dyvte.exporter import ExportSettings, export

    out = export(ExportSettings(out=tmp_path / "fp16", model=str(llama.model_dir), candidates=[2], dtype="float16",
                                progress=False, max_input_len=128, max_new_tokens=16))
    m = Manifest.load(out)
    assert m.dtype == "float16" and m.data["validation"]["segment_0"]["max_abs_err"] < 0.05
    report = lint_folder(m)
    assert report.ok and not report.findings, report.summary()
    seg = onnx.load(out / "onnx" / "segment_0.onnx", load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(seg)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    softmax_in = [types.get(n.input[0]) for n in seg.graph.node if n.op_type == "Softmax"]
    assert softmax_in and set(softmax_in) == {onnx.TensorProto.FLOAT}
    assert {i.data_type for i in seg.graph.initializer if i.name.endswith("proj.weight")} == {onnx.TensorProto.FLOAT16}


def test_profile(llama, tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(main, ["profile", str(llama.engine_dir), "--backend", "onnxruntime", "--reps", "2",
                                    "--json", str(out), "--plot", str(tmp_path / "p.png"), "--polygraphy"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    parts = data["parts_s"]
    for key in ("vision", "embed", "segment_0 full", "segment_3 text", "segment_2 decode", "gate", "head"):
        assert parts[key] > 0, key
    assert set(data["end_to_end"]) == {"never", "gate"}
    assert "polygraphy run onnx/segment_0.onnx --onnxrt" in res.stdout
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_polygraphy_commands_run(llama):
    """The documented polygraphy command for a decoder segment really runs (ONNX Runtime, CPU)."""
    from dyvte.engines.manifest import Manifest
    from dyvte.engines.profile import polygraphy_commands

    m = Manifest.load(llama.engine_dir)
    cmds = polygraphy_commands(m, text_tokens=8)
    for c in cmds:  # every axis resolved to a number
        shapes = c.split("--input-shapes ")[1].split(" --")[0].split("  #")[0].split()
        assert all(re.fullmatch(r"[\w.]+:\[(\d+(,\d+)*)?\]", s) for s in shapes), c
    full = next(c for c in cmds if c.endswith("segment_1 full"))
    T = m.model["vision"]["tokens_per_tile"] + 8
    assert f"attention_mask:[1,{T}]" in full  # total = past + seq = 0 + prompt
    decode = next(c for c in cmds if c.endswith("segment_1 decode"))
    assert f"attention_mask:[1,{T + 1}]" in decode and f"past.1.key:[1,2,{T},16]" in decode
    for mode in ("segment_1 full", "segment_1 decode", "gate default"):
        cmd = next(c for c in cmds if c.endswith(mode)).split("  #")[0]
        args = cmd.split()[2:]  # drop "polygraphy run"
        exe = [str(Path(sys.executable).with_name("polygraphy")), "run", *args]
        res = subprocess.run(exe, cwd=llama.engine_dir, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
