"""TensorRT engines against ONNX Runtime (skipped where TensorRT or a GPU is absent)."""

import numpy as np
import pytest

from dyvte import features

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not features.has_tensorrt(), reason="TensorRT is not installed (see README: Installing TensorRT)"),
    pytest.mark.skipif(not features.has_cuda(), reason="TensorRT needs a CUDA GPU (none visible)"),
]


def test_build_and_run_matches_onnxruntime(llama, tmp_path):
    from conftest import make_image
    from dyvte.engines.tensorrt import BuildSettings, build_engines
    from dyvte.exporter import ExportSettings, export
    from dyvte.runtime import Pipeline

    out = export(ExportSettings(out=tmp_path / "e", model=str(llama.model_dir), candidates=[1, 2, 3],
                                gates=llama.gates_file, dtype="float16", progress=False, max_input_len=128,
                                max_new_tokens=16, max_batch=4))
    report = build_engines(BuildSettings(out, progress=False))
    assert set(report["engines"]) >= {"vision", "embed", "head", "gate", "segment_0"}
    again = build_engines(BuildSettings(out, progress=False))  # resumes: nothing rebuilt
    assert again["total_build_seconds"] == report["total_build_seconds"]
    trt = Pipeline.load(out, backend="tensorrt")
    ort = Pipeline.load(llama.engine_dir, backend="onnxruntime")
    for policy in ("never", "layer:2", "gate"):
        a = trt.generate(make_image(0), "what color ?", max_new_tokens=6, policy=policy, return_logits=True)
        b = ort.generate(make_image(0), "what color ?", max_new_tokens=6, policy=policy, return_logits=True)
        assert a.exit_layer == b.exit_layer
        np.testing.assert_allclose(a.logits[0], b.logits[0], atol=5e-2 * np.abs(b.logits[0]).max() + 5e-2)
