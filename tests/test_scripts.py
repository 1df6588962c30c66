"""The benchmark scripts keep working: each runs end to end at a tiny size on CPU."""

import importlib.util
import json
from pathlib import Path

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


def test_bench_prefill_small(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    _load("bench_prefill").main(["--workdir", str(tmp_path), "--hidden", "64", "--layers", "4", "--exit", "2",
                                 "--reps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "never/hf time ratio" in text and "exit/never FLOPs ratio" in text
    res = json.loads(out.read_text())
    assert set(res["median"]) == {"never", "layer:2", "hf"} and res["visual_tokens"] == 576
    assert res["flops"]["exit"] < res["flops"]["never"]
