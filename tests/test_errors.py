"""Bad inputs give one clear error and leave nothing half-written."""

import json

import numpy as np
import pytest

from conftest import copy_engine, make_image
from dyvte.errors import EngineFolderError, InputError, PolicyError


@pytest.fixture
def engine_copy(llama, tmp_path):
    return copy_engine(llama.engine_dir, tmp_path)


def test_missing_image(llama, pipelines, tmp_path):
    with pytest.raises(InputError, match="not found"):
        pipelines(llama.engine_dir).generate(tmp_path / "nope.png", "what color ?")


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_corrupt_image(llama, pipelines, tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(InputError, match="cannot read image"):
        pipelines(llama.engine_dir).generate(bad, "what color ?")


def test_truncated_image(llama, pipelines, tmp_path):
    good = tmp_path / "good.jpg"
    make_image(0, size=(200, 200)).save(good)
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match="cannot read image"):
        pipelines(llama.engine_dir).generate(bad, "what color ?")


def test_prompt_over_exported_limit(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    limit = pipe.manifest.limits["max_input_len"]
    with pytest.raises(InputError, match=f"at most {limit}"):
        pipe.generate(make_image(0), "what color " * limit)


def test_too_many_new_tokens(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.generate(make_image(0), "what ?", max_new_tokens=pipe.manifest.limits["max_new_tokens"] + 1)


@pytest.mark.parametrize("policy,match", [("sometimes", "unknown policy"), ("layer:x", "integer"),
                                          ("layer:3", None), ("vtw", "calibrate-vtw")])
def test_bad_policies(llama, pipelines, policy, match):
    pipe = pipelines(llama.engine_dir)
    if match is None:  # layer:3 is a candidate of this folder: fine
        pipe.generate(make_image(0), "what ?", max_new_tokens=1, policy=policy)
        return
    with pytest.raises(PolicyError, match=match):
        pipe.generate(make_image(0), "what ?", max_new_tokens=1, policy=policy)


def test_non_candidate_layer(tiny_models, pipelines):
    q = tiny_models("qwen2_full")  # candidates 2, 4
    with pytest.raises(PolicyError, match="can exit only at 0, 2, 4 or 5"):
        pipelines(q.engine_dir).generate(make_image(0), "what ?", policy="layer:3")


def test_gate_policy_without_gates(llama, tmp_path):
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    out = export(ExportSettings(out=tmp_path / "nogates", model=str(llama.model_dir), candidates=[2], progress=False))
    pipe = Pipeline.load(out, backend="onnxruntime")
    with pytest.raises(PolicyError, match="--gates"):
        pipe.generate(make_image(0), "what ?", policy="gate")
    assert pipe.generate(make_image(0), "what ?", max_new_tokens=2).policy == "never"  # auto without gates


def test_wrong_pixel_shape_and_ids(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    from dyvte.runtime.inputs import encode

    ids, vision = encode(pipe.processor, make_image(0), "what ?")
    pixels = vision["pixel_values"]
    with pytest.raises(InputError, match=r"pixel_values must have shape \[images, 3, 30, 30\], got \(1, 3, 16, 16\)"):
        pipe.generate_ids(ids[None].numpy(), np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="no pixel_values were given"):
        pipe.generate_ids(ids[None].numpy(), None)
    with pytest.raises(InputError, match="got 2 images but the prompts hold 1"):
        pipe.generate_ids(ids[None].numpy(), np.concatenate([pixels.numpy()] * 2))
    with pytest.raises(InputError, match="image_sizes: not an input of LlavaForConditionalGeneration"):
        pipe.generate_ids(ids[None].numpy(), pixels.numpy(), image_sizes=np.array([[30, 30]]))
    bad = ids.clone()
    bad[-1] = 10_000
    with pytest.raises(InputError, match="vocabulary"):
        pipe.generate_ids(bad[None].numpy(), pixels.numpy())
    first_image = int((ids == pipe.manifest.model["image_token_id"]).nonzero()[0])
    one_short = np.delete(ids.numpy(), first_image)[None]
    with pytest.raises(InputError, match="multiple"):
        pipe.generate_ids(one_short, pixels.numpy())
    with pytest.raises(InputError, match=r"\[B,T\]"):
        pipe.generate_ids(ids.numpy(), pixels.numpy())


def test_batch_over_limit(llama, pipelines):
    pipe = pipelines(llama.engine_dir)
    n = pipe.manifest.limits["max_batch"] + 1
    with pytest.raises(InputError, match="exceeds this engine folder's limit"):
        pipe.generate([make_image(0)] * n, ["what ?"] * n)


def _load(path):
    from dyvte.runtime import Pipeline

    return Pipeline.load(path, backend="onnxruntime")


def test_missing_file(engine_copy):
    (engine_copy / "onnx" / "segment_1.onnx.data").unlink()
    with pytest.raises(EngineFolderError, match="missing onnx/segment_1.onnx.data"):
        _load(engine_copy)


def test_corrupted_file(engine_copy):
    path = engine_copy / "onnx" / "segment_2.onnx.data"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFolderError, match="checksum"):
        _load(engine_copy)


def test_truncated_file(engine_copy):
    path = engine_copy / "onnx" / "head.onnx"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(EngineFolderError, match="corrupted or truncated"):
        _load(engine_copy)


def test_corrupted_file_without_verification_still_fails_cleanly(engine_copy):
    from dyvte.runtime import Pipeline

    path = engine_copy / "onnx" / "head.onnx"
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size, not a protobuf
    with pytest.raises(EngineFolderError):
        Pipeline.load(engine_copy, backend="onnxruntime", verify=False)


def test_manifest_problems(engine_copy):
    mpath = engine_copy / "manifest.json"
    original = mpath.read_text()
    mpath.write_text("{ not json")
    with pytest.raises(EngineFolderError, match="not valid JSON"):
        _load(engine_copy)
    data = json.loads(original)
    data["schema_version"] = 99
    mpath.write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match="schema"):
        _load(engine_copy)
    data = json.loads(original)
    data["parts"]["head"]["onnx"] = "../../etc/passwd"
    mpath.write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match="outside the engine folder"):
        _load(engine_copy)
    data = json.loads(original)
    data["files"]["/etc/passwd"] = {"size": 1, "sha256": "0"}
    mpath.write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match="relative path"):
        _load(engine_copy)
    data = json.loads(original)
    del data["parts"]["embed"]
    mpath.write_text(json.dumps(data))
    with pytest.raises(EngineFolderError, match="malformed"):
        _load(engine_copy)
    mpath.unlink()
    with pytest.raises(EngineFolderError, match="no manifest.json"):
        _load(engine_copy)


def test_not_a_folder(tmp_path):
    with pytest.raises(EngineFolderError, match="does not exist"):
        _load(tmp_path / "missing")


@pytest.mark.skipif(__import__("dyvte.features", fromlist=["x"]).has_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_absent_is_one_clear_error(llama, tmp_path):
    from click.testing import CliRunner

    from dyvte.cli import export_main, main
    from dyvte.errors import BackendUnavailableError
    from dyvte.runtime import Pipeline

    out = tmp_path / "trt"
    res = CliRunner().invoke(export_main, ["--model", str(llama.model_dir), "--out", str(out), "--engines", "tensorrt"])
    assert res.exit_code == 1 and "TensorRT is not installed" in res.output
    assert not out.exists() and not out.with_name("trt.partial").exists()  # failed before exporting anything
    res = CliRunner().invoke(main, ["build", str(llama.engine_dir)])
    assert res.exit_code == 1 and "TensorRT is not installed" in res.output
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        Pipeline.load(llama.engine_dir, backend="tensorrt")
