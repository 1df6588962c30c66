"""Each exported part described once: its module, I/O names with named dynamic axes, dtypes
and example inputs for tracing. The exporter, the validator, the manifest and the TensorRT
profiles all read these descriptions.

Named axes: ``batch``, ``seq`` (new tokens), ``past`` (cached tokens), ``total`` (past + seq),
``images``; a family's vision part may name its own (Qwen-VL: ``patches``, ``tokens``, ...). Every
other axis is fixed by the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .modules import DecoderSegment, Embed, GateBank, Head, TextSpec, VisionEncoder, segment_extra_inputs


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints and axis names
    dtype: str  # numpy/torch dtype name: float32, float16, bfloat16, int64

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Part:
    name: str  # vision | embed | segment_<i> | gate | head
    kind: str  # vision | embed | segment | gate | head
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example: tuple = ()
    info: dict = field(default_factory=dict)  # kind-specific facts (layer range, gate layers)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def segment_io(spec: TextSpec, start: int, end: int, dtype: str):
    hkv, hd, d = spec.num_kv_heads, spec.head_dim, spec.hidden_size
    positions = [spec.rope_rows, "batch", "seq"] if spec.rope_rows > 1 else ["batch", "seq"]  # M-RoPE: 3 rows
    inputs = [
        TensorSpec("hidden_states", ["batch", "seq", d], dtype),
        TensorSpec("position_ids", positions, "int64"),
        TensorSpec("attention_mask", ["batch", "total"], "int64"),
    ]
    extra = {"key_positions": ["batch", "total"], "token_groups": ["batch", "total"],
             "deepstack": ["batch", "seq", spec.deepstack_layers, d]}
    for name in segment_extra_inputs(spec, start, end):  # family inputs (modules.py docstring)
        inputs.append(TensorSpec(name, extra[name], dtype if name == "deepstack" else "int64"))
    outputs = [TensorSpec("hidden_states_out", ["batch", "seq", d], dtype)]
    if end < spec.num_layers:  # FastV scores for a pruning stage at layer `end` (modules.DecoderSegment)
        outputs.append(TensorSpec("attention_last", ["batch", "total"], "float32"))
    for i in range(start, end):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past.{i}.{kind}", ["batch", hkv, "past", hd], dtype))
            outputs.append(TensorSpec(f"present.{i}.{kind}", ["batch", hkv, "total", hd], dtype))
    return inputs, outputs


def segment_part(index: int, module: DecoderSegment, dtype: str) -> Part:
    spec, start, end = module.spec, module.start, module.end
    inputs, outputs = segment_io(spec, start, end, dtype)
    B, S, P = 2, 3, 2  # S > 1 so tracing keeps the general prefill path
    tdt = getattr(torch, dtype)
    g = _gen(index)
    pos = torch.arange(P, P + S).repeat(B, 1)  # [B,S]
    if spec.rope_rows > 1:
        pos = torch.stack([pos + r for r in range(spec.rope_rows)])  # [R,B,S], distinct rows
    example = [
        torch.randn(B, S, spec.hidden_size, generator=g).to(tdt),
        pos,
        torch.ones(B, P + S, dtype=torch.int64),
    ]
    extra = {"key_positions": torch.arange(P + S).repeat(B, 1), "token_groups": torch.tensor([[0, 1, 1, 0, 0]] * B),
             "deepstack": torch.randn(B, S, spec.deepstack_layers, spec.hidden_size, generator=g).to(tdt)}
    names = segment_extra_inputs(spec, start, end)
    example += [extra[name] for name in names]
    example += [torch.randn(B, spec.num_kv_heads, P, spec.head_dim, generator=g).to(tdt)
                for _ in inputs[3 + len(names):]]
    return Part(f"segment_{index}", "segment", module, inputs, outputs, tuple(example), {"layers": [start, end]})


def embed_part(module: Embed, dtype: str) -> Part:
    d = module.embed_tokens.embedding_dim
    return Part(
        "embed",
        "embed",
        module,
        [TensorSpec("input_ids", ["batch", "seq"], "int64")],
        [TensorSpec("inputs_embeds", ["batch", "seq", d], dtype)],
        (torch.tensor([[1, 2, 3], [4, 5, 6]]),),
    )


def head_part(module: Head, dtype: str) -> Part:
    d, v = module.lm_head.in_features, module.lm_head.out_features
    return Part(
        "head",
        "head",
        module,
        [TensorSpec("hidden_states", ["batch", "seq", d], dtype)],
        [TensorSpec("logits", ["batch", "seq", v], "float32")],
        (torch.randn(2, 3, d, generator=_gen(1)).to(getattr(torch, dtype)),),
    )


def gate_part(module: GateBank, layers: list[int], dtype: str) -> Part:
    d = module.fc1.shape[2] // 2
    g = _gen(2)
    example = (
        torch.randn(2, 5, d, generator=g).to(getattr(torch, dtype)),
        torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]]),
        torch.tensor(0),
    )
    return Part(
        "gate",
        "gate",
        module,
        [
            TensorSpec("hidden_states", ["batch", "seq", d], dtype),
            TensorSpec("text_mask", ["batch", "seq"], "int64"),
            TensorSpec("gate_index", [], "int64"),
        ],
        [TensorSpec("probs", ["batch", 2], "float32")],
        example,
        {"layers": list(layers), "hidden": int(module.fc1.shape[1])},
    )


def vision_part(module: VisionEncoder, image_shape: tuple[int, int, int], num_visual: int, dim: int, dtype: str) -> Part:
    c, h, w = image_shape
    return Part(
        "vision",
        "vision",
        module,
        [TensorSpec("pixel_values", ["images", c, h, w], "float32")],
        [TensorSpec("image_features", ["images", num_visual, dim], dtype)],
        (torch.randn(2, c, h, w, generator=_gen(3)),),
    )
