"""The command line through click's CliRunner (and the installed scripts in a subprocess)."""

import json
import subprocess
import sys

from click.testing import CliRunner

from dyvte.cli import export_main, main


def test_run_json(llama, image_file):
    res = CliRunner().invoke(main, ["run", "--engine-dir", str(llama.engine_dir), "--image", str(image_file),
                                    "--prompt", "what color is the circle ?", "--policy", "layer:2",
                                    "--max-new-tokens", "5", "--json", "--backend", "onnxruntime"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["exit_layer"] == 2 and out["policy"] == "layer:2" and out["num_layers"] == 4
    assert 1 <= len(out["token_ids"]) <= 5
    assert {"prefill_s", "decode_s", "decode_tokens_per_s"} <= set(out["timings"])


def test_run_text(llama, image_file):
    res = CliRunner().invoke(main, ["run", "--engine-dir", str(llama.engine_dir), "--image", str(image_file),
                                    "--prompt", "what color ?", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert "exit layer" in res.stderr and "policy gate" in res.stderr and "tokens/s" in res.stderr


def test_run_errors_are_one_line(llama, tmp_path, image_file):
    cases = [
        (["--image", str(tmp_path / "missing.png")], "not found"),
        (["--image", str(image_file), "--policy", "whenever"], "unknown policy"),
        (["--image", str(image_file), "--policy", "layer:7"], "can exit only at"),
    ]
    for extra, msg in cases:
        res = CliRunner().invoke(main, ["run", "--engine-dir", str(llama.engine_dir), "--prompt", "hi", *extra])
        assert res.exit_code == 1, res.output
        assert res.stderr.startswith("error: ") and msg in res.stderr and res.stderr.count("\n") == 1
        assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", "--engine-dir", str(tmp_path / "nope"), "--image", str(image_file),
                                    "--prompt", "hi"])
    assert res.exit_code == 1 and "does not exist" in res.stderr


def test_inspect(llama):
    res = CliRunner().invoke(main, ["inspect", str(llama.engine_dir)])
    assert res.exit_code == 0, res.output
    assert "candidates     [1, 2, 3]" in res.stdout and "segment_3" in res.stdout
    res = CliRunner().invoke(main, ["inspect", str(llama.engine_dir), "--json"])
    assert json.loads(res.stdout)["candidates"] == [1, 2, 3]


def test_export_cli(llama, tmp_path):
    out = tmp_path / "e"
    args = ["--model", str(llama.model_dir), "--out", str(out), "--candidates", "2", "--no-validate"]
    res = CliRunner().invoke(export_main, args)
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").is_file()
    res = CliRunner().invoke(export_main, args)
    assert res.exit_code == 1 and "--overwrite" in res.stderr
    res = CliRunner().invoke(main, ["export", *args, "--overwrite", "--candidates", "1,x"])
    assert res.exit_code == 2 and "comma-separated" in res.output


def test_bare_imports_and_help():
    """Importing dyvte and every CLI --help must not import torch/onnxruntime/transformers."""
    code = (
        "import sys, dyvte, dyvte.cli, dyvte.exporter, dyvte.engines, dyvte.runtime, dyvte.runtime.backends\n"
        "from click.testing import CliRunner\n"
        "from dyvte.cli import main, export_main\n"
        "for args in ([], ['run'], ['inspect'], ['export']):\n"
        "    assert CliRunner().invoke(main, [*args, '--help']).exit_code == 0, args\n"
        "assert CliRunner().invoke(export_main, ['--help']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'transformers', 'tensorrt', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
