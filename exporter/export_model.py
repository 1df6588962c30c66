"""HF LLaVA -> engine folder: ONNX parts, manifest, processor, gates.

The export is staged in ``<out>.partial/`` and moved to ``<out>`` only when complete, so a
folder at ``<out>`` is always whole. Every finished part is recorded in the staging folder's
``export-state.json`` with a key (model, dtype, opset, layers, gates); re-running the same
command after an interruption skips the parts whose key and files still match and redoes the
rest.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dyvte import __version__
from dyvte.engines.files import save_onnx, sha256_file, write_json
from dyvte.engines.manifest import FORMAT, Manifest
from dyvte.errors import DyvteError, ExportError, InputError
from dyvte.settings import (
    DEFAULT_DTYPE,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_INPUT_LEN,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_OPSET,
    DTYPES,
    MANIFEST_NAME,
    MAX_OPSET,
    MIN_OPSET,
    SCHEMA_VERSION,
    default_candidates,
)

from . import hf
from . import parts as P
from .fused import FUSED, fused_attention, fused_part, save_sharing, static_cache_runner, unsupported
from .modules import GateBank
from .quantize import QUANTIZED_KINDS, make_scheme, quantize_graph
from .validate import validate, validate_quantized

STATE_NAME = "export-state.json"
VISION_EXTRAS = "vision_extras.safetensors"


@dataclass
class ExportSettings:
    """Everything ``dyvte-export`` takes (the CLI maps its options one-to-one onto this)."""

    out: Path
    model: str | None = None  # folder, preset or repo id; None = embedded demo model
    candidates: list[int] | None = None  # None = settings.default_candidates(L)
    prune_layers: list[int] | None = None  # extra segment boundaries for FastV stages (no gates, no exits there)
    gates: Path | None = None
    opset: int = DEFAULT_OPSET
    dtype: str = DEFAULT_DTYPE
    max_batch: int = DEFAULT_MAX_BATCH
    max_input_len: int | None = None  # None: min(2048, max_position_embeddings - max_new_tokens)
    max_new_tokens: int | None = None  # None: min(512, max_position_embeddings // 4)
    max_tiles: int | None = None  # most image tiles per prompt; None: the family's default
    max_pixels: int | None = None  # dynamic-resolution families (Qwen-VL): largest image in pixels
    quantize: str | None = None  # int8 | int4: weights of the segments and the head (needs dtype float32)
    block_size: int | None = None  # int4 block (default settings.INT4_BLOCK_SIZE)
    accuracy_level: int | None = None  # int4 MatMulNBits accuracy level (default settings.INT4_ACCURACY_LEVEL)
    fused: bool | None = None  # fused ONNX Runtime segment graphs (None: yes, except for bfloat16)
    validate: bool = True
    overwrite: bool = False
    progress: bool = True
    log: object = field(default=None, repr=False)  # callable(str) for status lines


def _versions(opset: int) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "dyvte": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": opset,
    }


def _digest(*items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: config bytes + weight file names, sizes and mtimes."""
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
    return _digest((model_dir / "config.json").read_bytes().decode(errors="replace"), weights)


def check_candidates(candidates: list[int], num_layers: int) -> list[int]:
    cands = sorted(set(int(c) for c in candidates))
    bad = [c for c in cands if not 1 <= c <= num_layers - 1]
    if bad or not cands and num_layers > 1 and candidates:
        raise InputError(f"candidate layers {bad} are outside [1, {num_layers - 1}] for a {num_layers}-layer model")
    return cands


def check_prune_layers(layers: list[int], num_layers: int) -> list[int]:
    """``--prune-layers``: extra segment boundaries in [1, L-1] where FastV stages may act."""
    out = sorted(set(int(k) for k in layers))
    bad = [k for k in out if not 1 <= k <= num_layers - 1]
    if bad:
        raise InputError(f"--prune-layers {bad} are outside [1, {num_layers - 1}] for a {num_layers}-layer model "
                         "(a FastV stage acts at a layer inside the decoder)")
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise InputError(f"--out {out} is a non-empty folder that is not a dyvte engine folder; choose another path")
        if not overwrite:
            raise InputError(f"engine folder {out} already exists; pass --overwrite to replace it")


class _State:
    """``export-state.json`` in the staging folder: which parts are done, with what key."""

    def __init__(self, staging: Path):
        self.path = staging / STATE_NAME
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("parts", {})

    def done(self, name: str, key: str, root: Path) -> dict | None:
        rec = self.data["parts"].get(name)
        if not rec or rec.get("key") != key:
            return None
        for rel, meta in rec["files"].items():
            p = root / rel
            if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
                return None
        return rec

    def record(self, name: str, rec: dict) -> None:
        self.data["parts"][name] = rec
        write_json(self.path, self.data)


def _file_meta(root: Path, paths) -> dict:
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def _aliases(module, onnx_model) -> tuple[dict, list]:
    """Map module tensors the exporter deduplicated to the initializer holding their value."""
    import torch
    from onnx import numpy_helper

    names = {i.name for i in onnx_model.graph.initializer}
    state = module.state_dict()
    missing = [n for n in state if n not in names]
    if not missing:
        return {}, []

    def key(t):
        return (tuple(t.shape), hashlib.sha1(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest())

    by_value = {}
    for init in onnx_model.graph.initializer:
        arr = numpy_helper.to_array(init)
        by_value.setdefault((tuple(arr.shape), hashlib.sha1(arr.tobytes()).hexdigest()), init.name)
    aliases, unused = {}, []
    for n in missing:
        target = by_value.get(key(state[n].detach().cpu()))
        if target is None:
            unused.append(n)
        else:
            aliases[n] = target
    return aliases, unused


def _export_onnx(part, path: Path, opset: int, save=None):
    """Trace ``part.module`` to ONNX (TorchScript exporter) and save it with external data.

    Returns the written files and the parameter aliases (see :func:`_aliases`).
    """
    import tempfile

    import onnx
    import torch

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                part.module,
                part.example,
                str(raw),
                dynamo=False,
                input_names=[t.name for t in part.inputs],
                output_names=[t.name for t in part.outputs],
                dynamic_axes=part.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=False,  # keeps initializers named like the module's parameters
                custom_opsets={"com.microsoft": 1} if part.info.get("graph") == FUSED else None,
            )
        model = onnx.load(str(raw), load_external_data=True)
    model.producer_name, model.producer_version = "dyvte", __version__
    aliases, unused = _aliases(part.module, model)
    return (save or save_onnx)(model, path), aliases, unused


#: Export dtypes whose graphs ONNX Runtime's CPU provider cannot run: their parts are validated by
#: loading the written ONNX weights into the torch backend's modules instead.
TORCH_VALIDATED = ("bfloat16",)


def _session_runner(path: Path):
    """``run(feeds) -> outputs`` of an exported graph on ONNX Runtime (CPU)."""
    import torch

    from dyvte.runtime.backends.onnxruntime import create_session

    sess = create_session(path)

    def run(feeds):
        arrays = {k: v.detach().contiguous().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(o) for o in sess.run(None, arrays)]

    return run


def _torch_runner(part, path: Path, aliases: dict, unused, spec, config, dtype: str):
    """``run(feeds) -> outputs`` of the torch backend's module for ``part``, with the weights read
    back from the written ONNX file (validation where ONNX Runtime has no kernels)."""
    import torch

    from dyvte.runtime.backends.torch import materialize, onnx_source, part_builder

    tdt = getattr(torch, dtype)
    gate = part.kind == "gate"
    from dyvte.families import family_for_config

    build = part_builder(part.kind, part.info, spec, family_for_config(config), config, torch.float32 if gate else tdt)
    module = materialize(build,
                         onnx_source(path, aliases, unused), "cpu", torch.float32 if gate else tdt)

    def run(feeds):
        with torch.no_grad():
            out = module(*[feeds[t.name] for t in part.inputs])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run


def _traced(part, path: Path, opset: int, save=None):
    """:func:`_export_onnx` with export failures as one-line :class:`ExportError`."""
    try:
        return _export_onnx(part, path, opset, save)
    except DyvteError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {part.name} to ONNX failed: {str(exc).splitlines()[0][:300]}") from exc


#: Export dtypes ONNX Runtime's CPU provider runs (fused graphs are validated there).
ORT_CPU_DTYPES = ("float32", "float16")


def export(settings: ExportSettings) -> Path:
    """Export a VLM checkpoint to an engine folder; returns the folder path."""
    from tqdm.auto import tqdm

    from dyvte.models import load_config, locate_model

    log = settings.log or (lambda msg: None)
    out = Path(settings.out).expanduser()
    if settings.dtype not in DTYPES:
        raise InputError(f"--dtype {settings.dtype} is not one of {', '.join(DTYPES)}")
    if not MIN_OPSET <= settings.opset <= MAX_OPSET:
        raise InputError(f"--opset {settings.opset} is outside the supported range {MIN_OPSET}-{MAX_OPSET}")
    for name in ("max_batch", "max_input_len", "max_new_tokens", "max_tiles", "max_pixels"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    scheme = make_scheme(settings.quantize, settings.dtype, settings.block_size, settings.accuracy_level)
    fused = settings.fused if settings.fused is not None else settings.dtype in ORT_CPU_DTYPES
    if fused and settings.dtype not in ORT_CPU_DTYPES:
        raise InputError(f"fused graphs are validated on ONNX Runtime's CPU provider, which has no {settings.dtype} "
                         "kernels; export --dtype float16 for fused GPU graphs, or pass --no-fused")
    _check_out(out, settings.overwrite)

    from dyvte.families import family_for_config

    model_dir = locate_model(settings.model)
    config = load_config(model_dir)
    family = family_for_config(config)
    text_config = family.text_config(config)
    L = text_config.num_hidden_layers
    max_pos = text_config.max_position_embeddings
    max_new = settings.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max_pos // 4)
    max_input = settings.max_input_len or min(DEFAULT_MAX_INPUT_LEN, max_pos - max_new)
    if max_input + max_new > max_pos:
        raise InputError(
            f"--max-input-len + --max-new-tokens = {max_input + max_new} exceeds the model's "
            f"max_position_embeddings ({max_pos}); lower them"
        )
    candidates = check_candidates(settings.candidates if settings.candidates is not None else default_candidates(L), L)
    prune_layers = check_prune_layers(settings.prune_layers or [], L)
    gates_path = settings.gates
    if gates_path is None and settings.model is None:
        from dyvte.demo import default_gates

        gates_path = default_gates()  # the demo model ships trained gates
    gates = None
    if gates_path is not None:
        from dyvte.gates import load_gates

        gates = load_gates(gates_path, candidates, text_config.hidden_size)

    from dyvte.models import load_model, load_processor

    processor = family.limit_processor(load_processor(model_dir), settings.max_pixels, max_input)
    image_size = str(dict(getattr(processor.image_processor, "size", None) or {}))  # the vision part's limits

    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "onnx").mkdir(exist_ok=True)
    state = _State(staging)
    base = _digest(SCHEMA_VERSION, __version__, _model_fingerprint(model_dir), settings.dtype, settings.opset)
    bounds = [0, *sorted(set(candidates) | set(prune_layers)), L]  # segment starts: candidates and prune layers
    plan = [("vision", (image_size,)), ("embed", ()), *((f"segment_{i}", (a, b)) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))]
    gates_digest = sha256_file(Path(gates_path)) if gates else None
    if gates:
        plan.append(("gate", tuple(candidates)))
    plan.append(("head", ()))
    def variant(name):  # what else decides a part's files: fused graphs, quantization
        quantized = scheme.to_dict() if scheme and (name == "head" or name.startswith("segment_")) else None
        return (fused and name.startswith("segment_"), quantized and {k: quantized[k] for k in
                                                                      ("name", "block_size", "accuracy_level")})

    keys = {name: _digest(base, name, extra, gates_digest if name == "gate" else None, variant(name))
            for name, extra in plan}
    records = {name: state.done(name, keys[name], staging) for name, _ in plan}
    pending = [name for name, _ in plan if records[name] is None]
    if len(pending) < len(plan):
        log(f"resuming the export in {staging}: {len(plan) - len(pending)} of {len(plan)} parts already done")

    import torch

    model = None
    if pending:
        log(f"loading {model_dir}")
        model = load_model(model_dir, "float32" if settings.dtype == "float32" else settings.dtype)
    tdt = getattr(torch, settings.dtype)
    spec = hf.text_spec(model) if model is not None else None
    vision_meta = None
    bar = tqdm(total=len(plan), desc="export", unit="part", disable=not settings.progress, initial=len(plan) - len(pending))
    try:
        for name, extra in plan:
            if records[name] is not None:
                continue
            bar.set_postfix_str(name)
            if name == "vision":
                module = family.vision_from_hf(model, tdt)
                vision_meta = family.vision_meta(config, processor, module)
                part = family.vision_part(module, vision_meta, spec.hidden_size, settings.dtype)
            elif name == "embed":
                part = P.embed_part(hf.embed_from_hf(model, spec, tdt), settings.dtype)
            elif name == "head":
                part = P.head_part(hf.head_from_hf(model, spec, tdt), settings.dtype)
            elif name == "gate":
                bank = GateBank.from_gates(gates, candidates).eval()
                part = P.gate_part(bank, candidates, settings.dtype)
            else:
                index = int(name.split("_")[1])
                part = P.segment_part(index, hf.segment_from_hf(model, spec, *extra, tdt), settings.dtype)
            path = staging / "onnx" / f"{name}.onnx"
            max_position = max_input + max_new - 1
            quantized = scheme if scheme is not None and part.kind in QUANTIZED_KINDS else None
            graph_part, graphs, errors = part, {}, {}
            why_not = unsupported(part.module.spec) if fused and part.kind == "segment" else None
            if why_not and settings.fused:
                raise InputError(f"--fused: {why_not}; export with --no-fused")
            fused_here = fused and part.kind == "segment" and why_not is None

            def check(p, run, tolerance=None):
                return validate(p, run, model, settings.dtype, gates, max_position=max_position,
                                vision_meta=vision_meta, tolerance=tolerance) if settings.validate else None

            if quantized is None:
                written, aliases, unused = _traced(part, path, settings.opset)
                runner = (_torch_runner(part, path, aliases, unused, spec, config, settings.dtype)
                          if settings.dtype in TORCH_VALIDATED and settings.validate else _session_runner(path))
                err = check(part, runner)
                if fused_here:  # the same weights, read from the plain graph's data file
                    fpart, fpath = fused_part(part), staging / "onnx" / f"{name}.fused.onnx"
                    with fused_attention(part.module):
                        written += _traced(fpart, fpath, settings.opset,
                                           save=lambda m, p: save_sharing(m, p, path))[0]
                    errors["fused"] = check(part, static_cache_runner(_session_runner(fpath)))
                    graphs[FUSED] = {"onnx": f"onnx/{fpath.name}", "inputs": [t.to_dict() for t in fpart.inputs],
                                     "outputs": [t.to_dict() for t in fpart.outputs]}
            else:  # trace the float graph to a scratch folder, check it, quantize it into place
                import tempfile

                graph_part = fused_part(part) if fused_here else part
                adapt = static_cache_runner if graph_part is not part else (lambda run: run)
                with tempfile.TemporaryDirectory(dir=staging, prefix=".float-") as tmp:
                    src = Path(tmp) / path.name
                    with fused_attention(part.module) if graph_part is not part else contextlib.nullcontext():
                        _, aliases, unused = _traced(graph_part, src, settings.opset)
                    errors["float"] = check(part, adapt(_session_runner(src)))
                    try:
                        written = quantize_graph(src, path, quantized)
                    except DyvteError:
                        raise
                    except Exception as exc:
                        raise ExportError(f"quantizing {name} ({quantized.name}) failed: "
                                          f"{str(exc).splitlines()[0][:300]}") from exc
                err = check(part, adapt(_session_runner(path)), tolerance=quantized.name)
                aliases, unused = {}, []  # quantized weights are no module parameters
            info = {**graph_part.info, **({"unused": unused} if unused else {})}
            if quantized is not None:
                info["quantized"] = quantized.name
            rec = {
                "key": keys[name],
                "files": _file_meta(staging, written),
                "part": {
                    "kind": part.kind,
                    "onnx": f"onnx/{name}.onnx",
                    "inputs": [t.to_dict() for t in graph_part.inputs],
                    "outputs": [t.to_dict() for t in graph_part.outputs],
                    "info": info,
                    "aliases": aliases,
                    **({"graphs": graphs} if graphs else {}),
                },
                "max_abs_err": err,
                "errors": errors,
            }
            if name == "vision":
                rec["vision"] = vision_meta
                extras = {k: v.detach().float().contiguous() for k, v in family.vision_extras(model).items()}
                if extras:  # e.g. LLaVA-NeXT's image_newline, used when packing tile features
                    from safetensors.torch import save

                    from dyvte.engines.files import write_atomic

                    write_atomic(staging / VISION_EXTRAS, save(extras))
                    rec["files"].update(_file_meta(staging, [staging / VISION_EXTRAS]))
                else:
                    (staging / VISION_EXTRAS).unlink(missing_ok=True)
            rec["text"] = spec.to_dict()
            state.record(name, rec)
            records[name] = rec
            bar.update(1)
    finally:
        bar.close()

    # processor, config, gates, manifest -----------------------------------------------------
    proc_dir = staging / "processor"
    if proc_dir.exists():
        shutil.rmtree(proc_dir)
    family.save_processor(processor, proc_dir)
    shutil.copyfile(model_dir / "config.json", staging / "hf_config.json")
    gates_file = staging / "gates.safetensors"
    if gates:
        shutil.copyfile(gates_path, gates_file)
    else:
        gates_file.unlink(missing_ok=True)
    wanted = {f"onnx/{name}{ext}" for name, _ in plan for ext in (".onnx", ".onnx.data", ".fused.onnx")}
    for p in (staging / "onnx").iterdir():  # parts of an earlier, different plan
        if f"onnx/{p.name}" not in wanted:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    text = records["head"]["text"]
    vision = dict(records["vision"]["vision"])
    vision["max_tiles"] = int(settings.max_tiles or family.default_max_tiles(vision, max_input))
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": settings.dtype,
        "quantization": scheme.to_dict() if scheme else None,
        "opset": settings.opset,
        "model": {
            "source": str(settings.model) if settings.model else "dyvte demo model (embedded)",
            "fingerprint": _model_fingerprint(model_dir),
            "family": family.name,
            "model_type": config.model_type,
            "text_model_type": text_config.model_type,
            "vision_model_type": config.vision_config.model_type,
            "image_token_id": family.image_token_id(config),
            "pad_token_id": _pad_id(text_config, processor),
            "eos_token_ids": _eos_ids(model_dir, text_config),
            "vision": vision,
            "vision_extras": VISION_EXTRAS if (staging / VISION_EXTRAS).is_file() else None,
        },
        "text": text,
        "candidates": candidates,
        "prune_layers": prune_layers,
        "limits": {
            "max_batch": settings.max_batch,
            "max_input_len": max_input,
            "max_new_tokens": max_new,
        },
        "segments": [name for name, _ in plan if name.startswith("segment_")],
        "parts": {name: records[name]["part"] for name, _ in plan},
        "gates": {"file": "gates.safetensors", "layers": candidates} if gates else None,
        "processor": "processor",
        "hf_config": "hf_config.json",
        "validation": {name: {"max_abs_err": records[name]["max_abs_err"],
                              **{f"{k}_max_abs_err": v for k, v in records[name].get("errors", {}).items()}}
                       for name, _ in plan},
        "versions": _versions(settings.opset),
    }
    files = [p for p in staging.rglob("*") if p.is_file() and p.name not in (STATE_NAME, MANIFEST_NAME)]
    manifest["files"] = _file_meta(staging, sorted(files))
    write_json(staging / MANIFEST_NAME, manifest)
    if scheme is None:
        from dyvte.engines.lint import lint_folder

        report = lint_folder(Manifest.load(staging, verify=False))  # the manifest must parse; TensorRT lint
        for finding in report.findings:
            log(f"TensorRT lint: {finding}")
        manifest["lint"] = {"tensorrt": report.trt_version, "errors": len(report.errors),
                            "warnings": len(report.findings) - len(report.errors)}
    else:
        Manifest.load(staging, verify=False)  # the manifest must parse
        manifest["lint"] = {"tensorrt": None, "skipped": "quantized ONNX Runtime graphs (TensorRT quantizes a float "
                                                         "folder itself: dyvte build --quantize)"}
        if settings.validate:  # the whole folder against the float model: logits and greedy tokens
            if model is None:
                model = load_model(model_dir, "float32")
            check = validate_quantized(staging, model, scheme.name)
            manifest["validation"]["quantized"] = check
            log(f"{scheme.name} vs the float model on {check['prompts']} prompts: greedy-token agreement "
                f"{check['greedy_agreement']:.3f}, logit max|err| {check['logit_max_abs_err']:.3g} "
                f"(relative {check['logit_rel_err']:.3g})")
    write_json(staging / MANIFEST_NAME, manifest)
    (staging / STATE_NAME).unlink(missing_ok=True)
    _swap_into_place(staging, out)
    log(f"wrote {out}")
    return out


def _pad_id(text_config, processor) -> int:
    pad = getattr(processor.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = text_config.pad_token_id
    return int(pad if pad is not None else 0)


def _eos_ids(model_dir: Path, text_config) -> list[int]:
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
    if eos is None:
        eos = text_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``, replacing an old engine folder last."""
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
