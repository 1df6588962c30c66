"""Quantized TensorRT plans: Q/DQ ONNX from NVIDIA ModelOpt (``dyvte build --quantize``).

ONNX Runtime's quantized folders (``dyvte-export --quantize``) use ONNX Runtime's own ops, which
TensorRT's parser does not take. TensorRT quantizes from Q/DQ graphs instead: for each decoder
segment and the head of a *float* folder (its plain graphs, fp16 or fp32), NVIDIA ModelOpt's
``python -m modelopt.onnx.quantization --onnx_path ... --quantize_mode int8|fp8|int4`` writes
``trt/qdq/<part>.onnx`` with QuantizeLinear/DequantizeLinear pairs (int8 / fp8: weights and
activations, calibrated; int4: weight-only blocks, AWQ or RTN), and the plan is built from it as a
strongly typed network (precision from the Q/DQ types, no builder flags).

``nvidia-modelopt[onnx]`` 0.47.0 pins onnx~=1.21 and onnxruntime-gpu~=1.24, which conflict with
dyvte's pins, so ModelOpt runs in its own environment (``scripts/setup.sh --modelopt`` makes
``.venv/modelopt``), called as a subprocess with ``--modelopt-python``.

Calibration data are the parts' real inputs: the folder's own ONNX Runtime pipeline runs the
calibration prompts (synthetic scenes and questions, or a LLaVA-format file) with policy never,
and the prefill inputs of every segment and of the head are saved as ``trt/qdq/<part>.calib.npz``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from dyvte.errors import BackendUnavailableError, EngineFolderError, ExportError, InputError

#: ``dyvte build --quantize`` modes (ModelOpt's ``quantize_mode``).
TRT_QUANT_MODES = ("int8", "fp8", "int4")
#: Parts quantized for TensorRT (as for ONNX Runtime: vision, embed and gate stay in the folder's dtype).
QDQ_KINDS = ("segment", "head")
QDQ_DIR = "trt/qdq"
DEFAULT_CALIBRATION_SAMPLES = 16


def calibration_inputs(manifest, samples: int = DEFAULT_CALIBRATION_SAMPLES, data: Path | None = None,
                       image_root: Path | None = None) -> dict:
    """{part: {input name: array}} -- the prefill inputs each segment and the head get when the
    folder's ONNX Runtime pipeline answers ``samples`` calibration prompts together (one batch, left
    padded, policy never). ``data``: a LLaVA-format JSON (default: synthetic scenes)."""
    import torch

    from dyvte.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from dyvte.runtime.pipeline import Pipeline

    if manifest.quantization:
        raise InputError(f"{manifest.root} holds ONNX Runtime-quantized graphs; quantize a float folder for TensorRT")
    from dyvte.models import load_processor
    from dyvte.families import family_named

    runner = OnnxRuntimeRunner(manifest, graphs="plain")
    recorded: dict = {}

    class Recording:
        def __getattr__(self, name):
            return getattr(runner, name)

        def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
            if cache.length == 0 and f"segment_{index}" not in recorded:  # prefill of the whole batch
                feeds = {"hidden_states": hidden, "position_ids": position_ids, "attention_mask": attention_mask,
                         **(extra or {})}
                for i, (k, v) in enumerate(cache.kv):
                    names = runner._past_names[index][2 * i: 2 * i + 2]
                    feeds[names[0]], feeds[names[1]] = k, v
                recorded[f"segment_{index}"] = {n: t.detach().cpu().numpy() for n, t in feeds.items()}
            return runner.segment(index, hidden, position_ids, attention_mask, cache, mode, extra, scores)

        def head(self, hidden):
            recorded.setdefault("head", {"hidden_states": hidden.detach().cpu().numpy()})
            return runner.head(hidden)

    processor = load_processor(manifest.path(manifest.data["processor"]), family_named(manifest.model["family"]))
    pipe = Pipeline(manifest, Recording(), processor)
    images, prompts = _calibration_prompts(samples, data, image_root)
    with torch.no_grad():
        pipe.generate(images, prompts, max_new_tokens=1, policy="never")
    return recorded


def _calibration_prompts(samples: int, data: Path | None, image_root: Path | None):
    """(images, questions): synthetic scenes (dyvte.synth, seed 2 = the calibration split), or the
    first single-turn samples of a LLaVA-format file."""
    if data is None:
        from dyvte.synth import make_sample

        items = [make_sample(2, i) for i in range(samples)]
        return [it.image for it in items], [it.question for it in items]
    from dyvte.data import records_to_qa
    from dyvte.synth import load_records

    items = records_to_qa(load_records(data), image_root, samples)
    return [it.image for it in items], [it.question for it in items]


def modelopt_command(python: str, onnx_path: Path, mode: str, calib: Path | None, out: Path, dtype: str) -> list[str]:
    """The ModelOpt command line for one part (documented CLI of nvidia-modelopt 0.47.0)."""
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(onnx_path), "--quantize_mode", mode,
           "--output_path", str(out), "--use_external_data_format",
           "--high_precision_dtype", {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype],
           "--calibration_eps", "cuda:0", "cpu"]
    if calib is not None:
        cmd += ["--calibration_data_path", str(calib)]
    if mode == "int4":
        cmd += ["--calibration_method", "awq_clip" if calib is not None else "rtn_dq"]
    return cmd


def qdq_graphs(manifest, mode: str, python: str, samples: int = DEFAULT_CALIBRATION_SAMPLES, data=None,
               image_root=None, log=None, run=subprocess.run) -> dict:
    """Write ``trt/qdq/<part>.onnx`` for every segment and the head; returns {part: relative path}.
    Parts whose Q/DQ graph exists for the same source checksum and mode are kept (resumable)."""
    log = log or (lambda m: None)
    if mode not in TRT_QUANT_MODES:
        raise InputError(f"--quantize {mode} is not one of {', '.join(TRT_QUANT_MODES)} for TensorRT")
    if not Path(python).is_file():
        raise BackendUnavailableError(f"ModelOpt's Python {python} does not exist; make it with `scripts/setup.sh "
                                      "--modelopt` (nvidia-modelopt[onnx] needs its own environment)")
    root = manifest.root
    out_dir = root / QDQ_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    calib = None
    result = {}
    for name, part in manifest.parts.items():
        if part.kind not in QDQ_KINDS:
            continue
        src = manifest.path(part.onnx)
        key = json.dumps([manifest.data["files"].get(part.onnx + ".data", {}).get("sha256"), mode])
        out = out_dir / f"{name}.onnx"
        rel = f"{QDQ_DIR}/{name}.onnx"
        if state.get(name) == key and out.is_file():
            result[name] = rel
            continue
        cal_path = None
        if mode != "int4":
            if calib is None:
                log(f"recording calibration inputs ({samples} prompts)")
                calib = calibration_inputs(manifest, samples, data, image_root)
            cal_path = out_dir / f"{name}.calib.npz"
            np.savez(cal_path, **calib[name])
        log(f"ModelOpt {mode}: {name}")
        proc = run(modelopt_command(python, src, mode, cal_path, out, manifest.dtype), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"ModelOpt failed to quantize {name} ({mode}): {tail[0][:300]}")
        state[name] = key
        state_path.write_text(json.dumps(state, indent=2))
        result[name] = rel
    if not result:
        raise EngineFolderError(f"{root} has no segments to quantize")
    return result
