"""ONNX parts -> TensorRT plans, for TensorRT 10.x and 11.x (strongly typed networks).

Precision comes from the ONNX graphs (export with ``--dtype float16`` or ``bfloat16``; RMSNorm
and softmax stay float32 inside them), so no builder precision flags are used. Each decoder
segment becomes one engine holding its weights once, with three optimization profiles
(full / text prefill, decode: engines/profiles.py). All builds share one timing cache; a corrupt
or foreign one is replaced by a fresh one. Plans are named by a key (ONNX checksums, profiles,
TensorRT version, GPU), and every finished plan is recorded at once in ``trt/build-state.json``
and in the manifest (file checksums included, the build marked incomplete until the last plan),
so an interrupted build leaves a loadable folder and the next ``dyvte build`` resumes where it
stopped; plans of an earlier build are deleted only once nothing refers to them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dyvte.errors import BackendUnavailableError, EngineFolderError, ExportError

from .files import sha256_file, write_atomic, write_json
from .manifest import Manifest
from .profiles import Limits, input_shapes, part_profiles

PLAN_DIR = "trt"


def import_tensorrt():
    """The tensorrt module, or a one-line error saying how to get it."""
    from dyvte import features

    if not features.has_tensorrt():
        raise BackendUnavailableError(
            "TensorRT is not installed (PyPI's tensorrt wheels download the libraries from NVIDIA's index); "
            "install it as described in the README section 'Installing TensorRT', or use --backend torch/onnxruntime"
        )
    import tensorrt

    return tensorrt


def trt_major(trt) -> str:
    return trt.__version__.split(".")[0]


@dataclass
class BuildSettings:
    engine_dir: Path
    max_batch: int | None = None  # None: the folder's limits
    max_input_len: int | None = None
    max_new_tokens: int | None = None
    workspace_gib: float | None = None
    quantize: str | None = None  # int8 | fp8 | int4: Q/DQ graphs from NVIDIA ModelOpt (engines/modelopt.py)
    modelopt_python: str | None = None  # the Python of ModelOpt's environment (default .venv/modelopt/bin/python)
    calibration_data: Path | None = None  # LLaVA-format JSON (default: synthetic scenes)
    calibration_samples: int = 16
    image_root: Path | None = None
    progress: bool = True
    log: object = field(default=None, repr=False)


def _device() -> str:
    """The GPU plans are built for (a plan only runs on the GPU model it was built on)."""
    import torch

    if not torch.cuda.is_available():
        return "unknown GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def _key(manifest: Manifest, part, profiles: dict, version: str, device: str, source: Path | None = None) -> str:
    files = {rel: meta["sha256"] for rel, meta in manifest.data["files"].items() if rel.startswith(part.onnx)}
    if source is not None:  # a Q/DQ graph: its own bytes decide the plan
        files = {source.name: sha256_file(source), **{p.name: sha256_file(p) for p in source.parent.glob(
            source.name + "*.data")}}
    blob = json.dumps([files, profiles, version, device], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _timing_cache(config, path: Path, log):
    """The shared timing cache, or a fresh one when the file is corrupt or from another GPU/TensorRT."""
    cache = None
    if path.is_file():
        try:
            cache = config.create_timing_cache(path.read_bytes())
        except Exception:  # a corrupt file raises in some versions, returns None in others
            cache = None
        if cache is not None and not config.set_timing_cache(cache, ignore_mismatch=False):
            cache = None
        if cache is None:
            log(f"note: {path} is unreadable or from another GPU/TensorRT; starting a new timing cache")
    if cache is None:
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _record_engines(manifest: Manifest, results: dict, trt_version: str, device: str, limits: Limits,
                    complete: bool, quantize: str | None = None) -> None:
    """Write the plans built so far into the manifest (entries and checksums), atomically."""
    from dyvte.settings import MANIFEST_NAME

    data = manifest.data
    old = data.get("engines", {}).get("tensorrt", {})
    for rec in old.get("parts", {}).values():  # plans of an earlier build leave the manifest first
        data["files"].pop(rec["plan"], None)
    data.setdefault("engines", {})["tensorrt"] = {
        "version": trt_version, "device": device, "limits": dict(limits.__dict__), "complete": complete,
        "parts": {n: {k: r[k] for k in ("plan", "profiles", "device_memory")} for n, r in results.items()},
        "quantize": quantize}
    for r in results.values():
        data["files"][r["plan"]] = {"size": r["size"], "sha256": r["sha256"]}
    write_json(manifest.root / MANIFEST_NAME, data)


def build_engines(settings: BuildSettings) -> dict:
    """Build (or resume building) a TensorRT plan for every part; updates the manifest."""
    from tqdm.auto import tqdm

    from .lint import lint_folder

    trt = import_tensorrt()
    log = settings.log or (lambda m: None)
    manifest = Manifest.load(settings.engine_dir)
    limits = Limits.from_manifest(manifest, max_batch=settings.max_batch, max_input_len=settings.max_input_len,
                                  max_new_tokens=settings.max_new_tokens)
    version = trt_major(trt)
    report = lint_folder(manifest, version if version in ("10", "11") else "11", limits)
    if not report.ok:
        raise EngineFolderError("TensorRT lint failed: " + "; ".join(str(f) for f in report.errors[:3])
                                + " (run `dyvte lint` for the full report)")
    if manifest.quantization:
        raise EngineFolderError(f"{manifest.root} holds ONNX Runtime-quantized graphs (dyvte-export --quantize), which "
                                "TensorRT cannot parse; build a float folder with `dyvte build --quantize int8|fp8|int4`")
    qdq = {}
    if settings.quantize:
        from .modelopt import qdq_graphs

        python = settings.modelopt_python or str(Path(".venv/modelopt/bin/python").absolute())
        qdq = qdq_graphs(manifest, settings.quantize, python, settings.calibration_samples,
                         settings.calibration_data, settings.image_root, log)
    elif manifest.dtype == "float32":
        log("note: float32 graphs give float32 engines; export with --dtype float16 or bfloat16 for speed")
    root = manifest.root
    plan_dir = root / PLAN_DIR
    plan_dir.mkdir(exist_ok=True)
    state_path = plan_dir / "build-state.json"
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, ValueError):
        state = {}
    state.setdefault("parts", {})
    cache_path = plan_dir / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    device = _device()
    results = {}
    bar = tqdm(total=len(manifest.parts), desc="tensorrt", unit="engine", disable=not settings.progress)
    for name, part in manifest.parts.items():
        profiles = part_profiles(manifest, part, limits)
        source = manifest.path(qdq[name]) if name in qdq else None
        key = _key(manifest, part, profiles, trt.__version__, device, source)
        plan = plan_dir / f"{name}-{key}.plan"
        rec = state["parts"].get(name)
        if rec and rec["key"] == key and plan.is_file() and sha256_file(plan) == rec["sha256"]:
            results[name] = rec
            bar.update(1)
            continue
        bar.set_postfix_str(name)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source or manifest.path(part.onnx))):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {part.onnx}: {errs[:500]}")
        config = builder.create_builder_config()
        if settings.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30)))
        _timing_cache(config, cache_path, log)
        for axes in profiles.values():
            prof = builder.create_optimization_profile()
            for inp, (lo, opt, hi) in input_shapes(part, axes).items():
                prof.set_shape(inp, lo, opt, hi)
            config.add_optimization_profile(prof)
        t0 = time.perf_counter()
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ExportError(f"TensorRT failed to build {name}; see the TensorRT log above")
        seconds = time.perf_counter() - t0
        write_atomic(plan, memoryview(blob))
        timing = config.get_timing_cache()
        if timing is not None:
            write_atomic(cache_path, memoryview(timing.serialize()))
        engine = runtime.deserialize_cuda_engine(blob)
        per_profile = {prof_name: int(engine.get_device_memory_size_for_profile_v2(i))
                       for i, prof_name in enumerate(profiles)}
        del engine, blob, timing, config, parser, network, builder  # free GPU/host memory before the next part
        rec = {"key": key, "plan": f"{PLAN_DIR}/{plan.name}", "sha256": sha256_file(plan), "size": plan.stat().st_size,
               "profiles": list(profiles), "build_seconds": round(seconds, 2), "device_memory": per_profile}
        state["parts"][name] = rec
        write_json(state_path, state)
        results[name] = rec
        _record_engines(manifest, results, trt.__version__, device, limits, complete=False, quantize=settings.quantize)  # loadable after each plan
        bar.update(1)
    bar.close()
    _record_engines(manifest, results, trt.__version__, device, limits, complete=True, quantize=settings.quantize)
    keep = {Path(r["plan"]).name for r in results.values()}
    for stale in plan_dir.glob("*.plan"):  # earlier builds' plans, now referenced by nothing
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    report = {"tensorrt": trt.__version__, "device": device, "limits": limits.__dict__,
              "engines": {n: {k: r[k] for k in ("size", "build_seconds", "device_memory")} for n, r in results.items()},
              "total_build_seconds": round(sum(r["build_seconds"] for r in results.values()), 2)}
    write_json(root / "build_report.json", report)
    log(f"built {len(results)} TensorRT engines in {plan_dir}")
    return report
