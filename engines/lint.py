"""TensorRT-compatibility lint of an engine folder's ONNX parts, on CPU, without TensorRT.

Checks, per part: opset within the parser's range; every operator in TensorRT's ONNX support
table (engines/data/tensorrt_onnx_ops.json, with its source and version) and with a supported
data type; no custom domains; decoder segments free of If/Loop/Scan and ONNX Attention; softmax
and RMSNorm math in float32 in low-precision graphs; the manifest's I/O matching the graph; the
optimization profiles derived from the folder's limits consistent with the graphs (segment
outputs, ``attention_last`` [batch, total] float32 of every segment but the last included, only
on axes the profiles range).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from .profiles import Limits, part_profiles

_TABLE = Path(__file__).parent / "data" / "tensorrt_onnx_ops.json"
_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 11: "DOUBLE", 2: "UINT8", 3: "INT8"}
_COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


@functools.cache
def support_table() -> dict:
    return json.loads(_TABLE.read_text())


@dataclass
class Finding:
    level: str  # error | warning
    part: str
    message: str

    def __str__(self) -> str:
        return f"{self.level:<7} {self.part:<11} {self.message}"


@dataclass
class LintReport:
    trt_version: str
    findings: list = field(default_factory=list)
    checked: dict = field(default_factory=dict)  # part -> number of nodes

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, level, part, message):
        self.findings.append(Finding(level, part, message))

    def to_dict(self) -> dict:
        return {"tensorrt": self.trt_version, "ok": self.ok, "checked_nodes": self.checked,
                "findings": [f.__dict__ for f in self.findings]}

    def summary(self) -> str:
        t = support_table()
        head = (f"TensorRT {self.trt_version} lint ({len(self.checked)} parts, {sum(self.checked.values())} nodes; "
                f"table: {t['source']})")
        body = [str(f) for f in self.findings] or ["no problems found"]
        tail = f"{len(self.errors)} error(s), {len(self.findings) - len(self.errors)} warning(s)"
        return "\n".join([head, *body, tail])


def _types(model) -> dict[str, int]:
    """Element type of every value in the graph (after ONNX shape inference)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: fall back to what the file declares
        inferred = model
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _checked_values(node) -> tuple[list[str], str]:
    """Which values' types decide support for this node."""
    if node.op_type in _COMPARE or node.op_type in ("Shape", "Size"):
        return list(node.input), "input"
    if node.op_type == "Where":
        return list(node.input[1:]), "input"
    if node.op_type == "Cast":
        return [node.input[0], node.output[0]], "input/output"
    return list(node.output), "output"


def lint_part(report: LintReport, part, model, version: str) -> None:
    table = support_table()
    ops = table["operators"]
    lo, hi = table["versions"][version]["opset_range"]
    name = part.name
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or not lo <= opset <= hi:
        report.add("error", name, f"opset {opset} is outside TensorRT {version}'s range {lo}-{hi}; re-export with --opset")
    types = _types(model)
    report.checked[name] = len(model.graph.node)
    seen = set()
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            report.add("error", name, f"node {node.name or op} uses custom domain '{node.domain}' ({op}), "
                                      "which the TensorRT ONNX parser does not know")
            continue
        entry = ops.get(op)
        if entry is None or not entry["supported"]:
            if op not in seen:
                report.add("error", name, f"operator {op} is not supported by the TensorRT {version} ONNX parser")
            seen.add(op)
            continue
        if part.kind == "segment" and op in ("If", "Loop", "Scan"):
            report.add("error", name, f"control flow ({op}) in a decoder segment: TensorRT shape/rank errors follow")
        if op == "Attention":
            report.add("error", name, "ONNX Attention op with a KV cache is not supported by TensorRT's parser")
        values, where = _checked_values(node)
        for v in values:
            t = types.get(v)
            tname = _TYPE_NAMES.get(t)
            if tname is None or not entry["types"]:
                continue
            if tname not in entry["types"] and (op, tname) not in seen:
                seen.add((op, tname))
                report.add("error", name, f"{op} with {tname} {where} is not supported by TensorRT "
                                          f"(supported: {', '.join(entry['types'])})")
        if op in ("Softmax", "ReduceMean") and types.get(node.input[0]) in (10, 16) and (op, "lowp") not in seen:
            seen.add((op, "lowp"))
            report.add("warning", name, f"{op} runs in {_TYPE_NAMES[types[node.input[0]]]}; dyvte keeps softmax and "
                                        "RMSNorm math in float32 to avoid overflow")


def _check_io(report: LintReport, part, model, manifest, limits: Limits) -> None:
    g = model.graph
    init = {i.name for i in g.initializer}
    graph_io = {v.name: v for v in [*g.input, *g.output] if v.name not in init}
    for t in [*part.inputs, *part.outputs]:
        v = graph_io.get(t["name"])
        if v is None:
            report.add("error", part.name, f"manifest names {t['name']}, which the graph does not have")
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(t["shape"]):
            report.add("error", part.name, f"{t['name']}: graph rank {len(dims)}, manifest rank {len(t['shape'])}")
            continue
        for d, m in zip(dims, t["shape"]):
            if isinstance(m, int) and d.HasField("dim_value") and d.dim_value != m:
                report.add("error", part.name, f"{t['name']}: graph has fixed size {d.dim_value} where the manifest says {m}")
            if isinstance(m, str) and d.HasField("dim_value"):
                report.add("error", part.name, f"{t['name']}: axis '{m}' is fixed to {d.dim_value} in the graph; "
                                               "profiles cannot vary it")
    for prof, axes in part_profiles(manifest, part, limits).items():
        for ax, (lo, opt, hi) in axes.items():
            if not 0 <= lo <= opt <= hi or hi < 1 and ax not in ("past",):
                report.add("error", part.name, f"profile {prof}: axis {ax} range ({lo}, {opt}, {hi}) is empty or unordered")
    if part.kind == "segment":
        profiles = part_profiles(manifest, part, limits)
        axes = set().union(*(set(p) for p in profiles.values()))
        for t in part.outputs:  # output axes must be ones the profiles range (TensorRT sizes outputs from them)
            unknown = [d for d in t["shape"] if isinstance(d, str) and d not in axes]
            if unknown:
                report.add("error", part.name, f"output {t['name']} has axes {unknown} that no profile ranges "
                                               f"(profiles range {sorted(axes)})")
        scores = next((t for t in part.outputs if t["name"] == "attention_last"), None)
        if part.layers[1] < manifest.num_layers:
            if scores is None:
                report.add("warning", part.name, f"no attention_last output: fastv stages at layer {part.layers[1]} "
                                                 "cannot run; re-export the folder")
            elif scores["shape"] != ["batch", "total"] or scores["dtype"] != "float32":
                report.add("error", part.name, f"attention_last is {scores['dtype']} {scores['shape']}, the runtime "
                                               "reads float32 [batch, total]; re-export the folder")
        text = manifest.text
        total = limits.max_input_len + limits.max_new_tokens
        if total > text["max_position_embeddings"]:
            report.add("error", part.name, f"profiles reach {total} positions, the model has "
                                           f"{text['max_position_embeddings']}; lower --max-input-len/--max-new-tokens")
        from dyvte.families import family_named

        fewest = family_named(manifest.model["family"]).min_visual_tokens(manifest.model["vision"])
        if limits.max_input_len <= fewest:
            report.add("error", part.name, f"max_input_len {limits.max_input_len} leaves no room for text after "
                                           f"{fewest} visual tokens (one image)")


def lint_folder(manifest, trt_version: str = "10", limits: Limits | None = None) -> LintReport:
    """Lint every ONNX part of a loaded :class:`Manifest`."""
    import onnx

    if trt_version not in support_table()["versions"]:
        from dyvte.errors import InputError

        raise InputError(f"--trt-version must be one of {', '.join(support_table()['versions'])}")
    limits = limits or Limits.from_manifest(manifest)
    report = LintReport(trt_version)
    q = manifest.data.get("quantization")
    if q:  # ONNX Runtime's MatMulNBits graphs; TensorRT quantizes float folders itself
        report.add("error", "folder", f"{q['name']} weights in ONNX Runtime's quantized ops are not a TensorRT input; "
                                      "for TensorRT, export a float folder and run `dyvte build --quantize`")
        return report
    for part in manifest.parts.values():  # the plain graphs (fused ones are ONNX Runtime's, not linted)
        model = onnx.load(manifest.path(part.onnx), load_external_data=False)
        lint_part(report, part, model, trt_version)
        _check_io(report, part, model, manifest, limits)
    return report
