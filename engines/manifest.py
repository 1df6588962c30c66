"""``manifest.json``: what an engine folder holds and how to run it.

The manifest lists every part (ONNX graph, weights, I/O with named axes), the decoder segments
in order, the candidate exit layers, the gates, the model facts the runtime needs, limits, tool
versions and a checksum of every file. :meth:`Manifest.load` refuses folders that are missing
files, corrupted, of another schema version, or whose paths point outside the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dyvte.errors import EngineFolderError
from dyvte.settings import MANIFEST_NAME, SCHEMA_VERSION

from .files import inside, sha256_file

FORMAT = "dyvte-engine-folder"


@dataclass
class PartInfo:
    name: str
    kind: str
    onnx: str  # path relative to the folder
    inputs: list[dict]
    outputs: list[dict]
    info: dict
    aliases: dict  # module parameter name -> initializer name (deduplicated by the exporter)
    graphs: dict = None  # other graphs of the same part sharing its weights: {"fused": {onnx, inputs, outputs}}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "PartInfo":
        return cls(name, d["kind"], d["onnx"], d["inputs"], d["outputs"], d.get("info", {}), d.get("aliases", {}),
                   d.get("graphs") or {})

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "onnx": self.onnx,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "info": self.info,
            "aliases": self.aliases,
            **({"graphs": self.graphs} if self.graphs else {}),
        }

    @property
    def graph(self) -> str:
        """What ``onnx`` holds: ``plain`` (MatMul/Softmax attention, the TensorRT input) or ``fused``
        (ONNX Runtime contrib ops, in-place static KV cache: exporter/fused.py)."""
        return self.info.get("graph", "plain")

    @property
    def quantized(self) -> str | None:
        """The weight quantization scheme of this part's graph (``int8``, ``int4``) or None."""
        return self.info.get("quantized")

    def variant(self, graph: str) -> "PartInfo | None":
        """This part as its ``graph`` form (``plain`` or ``fused``), or None if the folder lacks it."""
        if graph == self.graph:
            return self
        g = (self.graphs or {}).get(graph)
        if g is None:
            return None
        return PartInfo(self.name, self.kind, g["onnx"], g["inputs"], g["outputs"], {**self.info, "graph": graph},
                        self.aliases)

    @property
    def layers(self) -> tuple[int, int]:
        a, b = self.info["layers"]
        return int(a), int(b)


class Manifest:
    """A parsed, checked ``manifest.json`` of the engine folder ``root``."""

    def __init__(self, root: Path, data: dict):
        self.root = Path(root)
        self.data = data
        self.parts = {n: PartInfo.from_dict(n, d) for n, d in data["parts"].items()}

    # -- facts ---------------------------------------------------------------------------
    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def text(self) -> dict:
        return self.data["text"]

    @property
    def num_layers(self) -> int:
        return int(self.data["text"]["num_layers"])

    @property
    def candidates(self) -> list[int]:
        return [int(c) for c in self.data["candidates"]]

    @property
    def prune_layers(self) -> list[int]:
        """Segment boundaries added for pruning stages besides the candidates (``--prune-layers``)."""
        return [int(k) for k in self.data.get("prune_layers", [])]

    @property
    def boundaries(self) -> list[int]:
        """Layers a segment starts at, 0 excluded: the candidates and the prune layers."""
        return sorted(set(self.candidates) | set(self.prune_layers))

    @property
    def limits(self) -> dict:
        return self.data["limits"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def quantization(self) -> dict | None:
        """The folder's weight quantization (scheme, options, tool) or None for float weights."""
        return self.data.get("quantization")

    @property
    def segments(self) -> list[PartInfo]:
        return [self.parts[n] for n in self.data["segments"]]

    @property
    def gate(self) -> PartInfo | None:
        return self.parts.get("gate")

    @property
    def gate_layers(self) -> list[int]:
        return [int(k) for k in self.gate.info["layers"]] if self.gate else []

    @property
    def calibration(self) -> dict:
        return self.data.get("calibration", {})

    def path(self, rel: str) -> Path:
        """Absolute path of a file named in the manifest (always inside the folder)."""
        return inside(self.root, rel)

    # -- I/O -----------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, verify: bool | str = True) -> "Manifest":
        """Parse and check ``root/manifest.json``: ``verify=True`` checks every file's size and sha256,
        ``False`` sizes only, ``"exists"`` only that files exist (lint reads graphs a user may edit)."""
        root = Path(root)
        if not root.is_dir():
            raise EngineFolderError(f"engine folder {root} does not exist; create it with `dyvte-export --out {root}`")
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            partial = root.with_name(root.name + ".partial")
            hint = f" (an interrupted export is in {partial}; re-run the same dyvte-export to resume)" if partial.exists() else ""
            raise EngineFolderError(f"{root} has no {MANIFEST_NAME}: not a complete dyvte engine folder{hint}; re-export it")
        try:
            data = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineFolderError(f"{mpath} is not valid JSON ({exc}); re-export the folder") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise EngineFolderError(f"{mpath} is not a dyvte manifest; re-export the folder with dyvte-export")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise EngineFolderError(
                f"{root} was written with manifest schema {data.get('schema_version')}, this dyvte reads "
                f"schema {SCHEMA_VERSION}; re-export it with this version"
            )
        try:
            manifest = cls(root, data)
            manifest.check_structure()
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineFolderError(f"{mpath} is malformed (missing or bad field {exc}); re-export the folder") from None
        manifest.check_files(hash_files=verify is True, sizes=verify != "exists")
        return manifest

    def check_structure(self) -> None:
        for name in self.data["segments"]:
            if name not in self.parts:
                raise KeyError(f"segments/{name}")
        for req in ("vision", "embed", "head"):
            if req not in self.parts:
                raise KeyError(f"parts/{req}")
        bounds = [0, *self.boundaries, self.num_layers]
        got = [self.parts[n].layers for n in self.data["segments"]]
        if got != list(zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"segments {got} do not match the boundaries {self.boundaries}")
        for rel in self.data["files"]:
            self.path(rel)

    def check_files(self, hash_files: bool = True, sizes: bool = True) -> None:
        """Every listed file exists (with its size when ``sizes``, and sha256 when ``hash_files``)."""
        for rel, meta in self.data["files"].items():
            p = self.path(rel)
            if not p.is_file():
                raise EngineFolderError(f"{self.root} is missing {rel}; the folder is incomplete, re-export it")
            if sizes and p.stat().st_size != meta["size"]:
                raise EngineFolderError(
                    f"{rel} in {self.root} has {p.stat().st_size} bytes, the manifest says {meta['size']}: "
                    "the file is corrupted or truncated; re-export the folder"
                )
            if hash_files and sha256_file(p) != meta["sha256"]:
                raise EngineFolderError(
                    f"{rel} in {self.root} fails its sha256 checksum: the file is corrupted; re-export the folder"
                )

    def summary(self) -> str:
        """A human-readable description (``dyvte inspect``)."""
        m, t = self.model, self.text
        lines = [
            f"engine folder  {self.root}",
            f"model          {m['source']}  ({t['num_layers']} layers, d={t['hidden_size']}, "
            f"heads {t['num_heads']}/{t['num_kv_heads']} kv, vocab {t['vocab_size']})",
            f"family         {m['family']} ({m['model_type']})",
            f"vision         {m['vision_model_type']}, {_family(m).describe(m['vision'])}",
            f"dtype / opset  {self.dtype} / {self.data['opset']}",
            f"weights        {_describe_weights(self)}",
            f"candidates     {self.candidates}",
            f"prune layers   {self.prune_layers or 'none'} (segment boundaries where fastv:K:R may act: "
            f"{self.boundaries})",
            f"gates          {'layers ' + str(self.gate_layers) if self.gate else 'none (policy gate unavailable)'}",
            f"limits         {self.limits}",
        ]
        cal = self.calibration.get("vtw")
        if cal:
            lines.append(f"vtw            exit layer {cal['exit_layer']} (eta={cal['eta']}, n={cal['samples']})")
        lines.append("parts:")
        sizes = {rel: meta["size"] for rel, meta in self.data["files"].items()}
        for name, part in self.parts.items():
            size = sum(s for rel, s in sizes.items() if rel.startswith(part.onnx))
            size += sum(s for rel, s in sizes.items() if any(rel == g["onnx"] for g in part.graphs.values()))
            extra = f" layers [{part.info['layers'][0]}, {part.info['layers'][1]})" if part.kind == "segment" else ""
            err = self.data.get("validation", {}).get(name, {}).get("max_abs_err")
            val = f"  max|err| vs torch {err:.2e}" if err is not None else ""
            graphs = "+".join([part.graph, *part.graphs]) + (f" {part.quantized}" if part.quantized else "")
            lines.append(f"  {name:<11} {part.kind:<8}{extra:<18} {size / 1e6:9.2f} MB  {graphs:<12}{val}")
        check = self.data.get("validation", {}).get("quantized")
        if check:
            lines.append(f"quantized vs float  greedy-token agreement {check['greedy_agreement']:.3f} on "
                         f"{check['tokens']} tokens, logit max|err| {check['logit_max_abs_err']:.3g} "
                         f"(relative {check['logit_rel_err']:.3g})")
        lines.append("versions       " + ", ".join(f"{k} {v}" for k, v in self.data["versions"].items()))
        return "\n".join(lines)


def _describe_weights(manifest) -> str:
    """One line on the folder's weights: float, or the quantization scheme and where it applies."""
    q = manifest.quantization
    if not q:
        return f"{manifest.dtype} (not quantized)"
    how = f"{q['name']}, MatMulNBits block {q['block_size']}, accuracy level {q['accuracy_level']}, symmetric"
    where = {"segment": "the decoder segments", "head": "the head"}
    return f"{how} in {' and '.join(where.get(p, p) for p in q['parts'])}; vision, embed and gate {manifest.dtype}"


def _family(model: dict):
    from dyvte.families import family_named

    return family_named(model["family"])


def synthetic_manifest(text: dict, candidates: list[int], num_visual_tokens: int, image_shape, limits: dict,
                       gate_hidden: int | None = None, image_token_id: int = 32000, eos_token_ids=(2,)) -> Manifest:
    """An in-memory manifest of a model shape without files (random-weight benchmarks)."""
    L = int(text["num_layers"])
    bounds = [0, *candidates, L]
    parts = {name: {"kind": name, "onnx": f"onnx/{name}.onnx", "inputs": [], "outputs": []} for name in ("vision", "embed", "head")}
    segments = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        segments.append(f"segment_{i}")
        parts[f"segment_{i}"] = {"kind": "segment", "onnx": f"onnx/segment_{i}.onnx", "inputs": [], "outputs": [],
                                 "info": {"layers": [a, b]}}
    if gate_hidden:
        parts["gate"] = {"kind": "gate", "onnx": "onnx/gate.onnx", "inputs": [], "outputs": [],
                         "info": {"layers": list(candidates), "hidden": gate_hidden}}
    data = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "dtype": "float16", "opset": 17,
            "model": {"source": "synthetic", "family": "llava", "model_type": "llava", "image_token_id": image_token_id,
                      "pad_token_id": 0, "eos_token_ids": list(eos_token_ids), "vision_model_type": "clip_vision_model",
                      "vision": {"tile_shape": list(image_shape), "tokens_per_tile": num_visual_tokens, "max_tiles": 1, "tiles_per_image": 1,
                                 "feature_layers": [-2], "feature_select": "default"}, "vision_extras": None},
            "text": dict(text), "candidates": list(candidates), "limits": dict(limits), "segments": segments,
            "parts": parts, "files": {}, "versions": {}}
    return Manifest(Path("."), data)
