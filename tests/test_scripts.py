"""The benchmark scripts keep working: each runs end to end at a tiny size on CPU."""

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_small_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    _load("bench_gpu").main(["--device", "cpu", "--dtype", "float32", "--layers", "4", "--hidden", "64",
                             "--vocab", "128", "--vision-layers", "1", "--vision-hidden", "64", "--image-size", "56",
                             "--patch", "14", "--text-tokens", "6", "--new-tokens", "3", "--reps", "1",
                             "--json", str(out)])
    text = capsys.readouterr().out
    assert "prefill time ratio layer:2/never" in text and "FLOPs ratio" in text
    res = json.loads(out.read_text())
    assert res["flops"]["layer:2"] < res["flops"]["never"]
    assert all(v[0] > 0 for v in res["decode_tokens_per_s"].values())
    assert res["hf_decode_tokens_per_s"][0] > 0 and "HF generate (sdpa)" in text


def test_torch_backend_load_memory(tmp_path, capsys):
    """Loading a ~190 MB (fp16) folder with the torch backend adds at most 1.3x the weights' bytes to
    the process's peak memory, in its own dtype and converted (meta-device build, one tensor at a time)."""
    rows = _load("bench_load_memory").main(["--hidden", "1024", "--layers", "2", "--vocab", "32000", "--vision-layers",
                                            "2", "--work", str(tmp_path), "--dtypes", "float16,bfloat16,float32"])
    assert "peak added GiB" in capsys.readouterr().out
    fp16, bf16, fp32 = rows
    assert fp16["weights"] > 150e6 and fp32["weights"] > 1.9 * fp16["weights"]  # the same tensors, twice the bytes
    for r in rows:
        assert 0 < r["added"] <= 1.3 * r["weights"], r


def test_bench_prefill_small(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    _load("bench_prefill").main(["--workdir", str(tmp_path), "--hidden", "64", "--layers", "4", "--exit", "2",
                                 "--reps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "never/hf time ratio" in text and "exit/never FLOPs ratio" in text
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"never", "layer:2", "hf"} and res["visual_tokens"] == 576
    assert res["flops"]["exit"] < res["flops"]["never"]


def test_bench_prefill_llava_next_small(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    _load("bench_prefill").main(["--workdir", str(tmp_path), "--family", "llava_next", "--image", "700", "340",
                                 "--hidden", "64", "--layers", "4", "--exit", "2", "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["family"] == "llava_next" and res["tiles"] >= 3 and res["visual_tokens"] > 2 * 576


def test_precision_report_small(tmp_path, capsys):
    rows = _load("precision_report").main(["--before", "60", "--after", "8", "--workdir", str(tmp_path)])
    assert "HF error" in capsys.readouterr().out
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16", "float32"} and all(np.isfinite(r["error"]) for r in rows)


def test_bench_prefill_qwen_small(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    _load("bench_prefill").main(["--workdir", str(tmp_path), "--family", "qwen2_5_vl", "--image", "200", "120",
                                 "--hidden", "64", "--layers", "4", "--exit", "2", "--reps", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["family"] == "qwen2_5_vl" and res["grids"] == [[1, 8, 14]] and res["visual_tokens"] == 28
    assert res["flops"]["exit"] < res["flops"]["never"] and res["vision_flops"] > 0
