"""Fused decoder-segment graphs for ONNX Runtime (``onnx/segment_i.fused.onnx``).

The same :class:`~dyvte.exporter.modules.DecoderSegment`, traced with every attention in its fused
form (:meth:`Attention.forward_fused`): the projections feed ONNX Runtime's
``com.microsoft::GroupQueryAttention`` directly in its [B,S,heads*hd] layout (no reshapes), with

* dyvte's own RoPE (``do_rotary=0``; q/k rotated here in float32, so kept positions after an exit
  and M-RoPE rows stay exact; GQA's built-in rotary takes one start offset per prompt);
* ``causal=0`` and every row counted as full length (``seqlens_k = T - 1``, ``total_sequence_length = T``):
  left padding, the causal part, text-only caches and the family masks (sliding windows, image
  blocks attending both ways) are all in ``attention_bias`` [B,1,S,T];
* an **in-place static KV cache**: ``past.{i}.key`` is a buffer of ``capacity`` >= T slots whose
  first T - S hold the cached tokens; GQA writes the S new ones at T - S .. T - 1 and returns the
  same buffer as ``present.{i}.key`` (the runner binds one buffer to both through I/O binding,
  so decoding copies no cache; slots >= T are never read);
* ``attention_last`` (FastV scores) from GQA's post-softmax ``output_qk`` (``qk_output=2``) of the
  segment's last layer: the head mean of the last query's probabilities, as the plain graph gives.

ONNX Runtime's GQA refuses a cached batch (P > 0) with several new tokens (S > 1) and B > 1; the
runner runs such calls row by row. Measurements behind the choice of ops: README "Fused and
quantized engines".
"""

from __future__ import annotations

import contextlib

import torch

#: ``graph`` name of fused segment graphs in the manifest (``parts.segment_i.graphs``).
FUSED = "fused"


def unsupported(spec) -> str | None:
    """Why a text decoder cannot have fused graphs (None: it can)."""
    if spec.head_dim % 8:
        return f"GroupQueryAttention needs a head size that is a multiple of 8 (this model: {spec.head_dim})"
    if spec.num_heads < 2:
        return "the TorchScript exporter fails on GroupQueryAttention with a single attention head"
    return None


def mask_value(dtype: torch.dtype) -> float:
    """The additive mask value of masked keys in a fused graph's ``attention_bias``: float32's
    lowest (as the plain graph), half of fp16/bf16's lowest so that adding a score cannot overflow."""
    low = torch.finfo(dtype).min
    return low if dtype == torch.float32 else low / 2


class GroupQueryAttention(torch.autograd.Function):
    """``com.microsoft::GroupQueryAttention`` with an in-place static cache (see module docstring).

    q [B,S,H*hd], k/v [B,S,Hkv*hd] (rotated), cache_key/cache_value [B,Hkv,C,hd], bias [B,1,S,T]
    (0 or the mask value) -> (out [B,S,H*hd], present key/value [B,Hkv,C,hd] with the new tokens
    at T-S..T-1, probs [B,H,S,T] softmax probabilities). The torch forward is the reference the
    exporter traces; ONNX Runtime runs the contrib op.
    """

    @staticmethod
    def forward(ctx, q, k, v, cache_key, cache_value, bias, num_heads: int, kv_heads: int, scale: float):
        B, S, _ = q.shape
        hd = cache_key.shape[-1]
        T = bias.shape[-1]
        key, value = cache_key.clone(), cache_value.clone()
        key[:, :, T - S:T] = k.view(B, S, kv_heads, hd).transpose(1, 2)
        value[:, :, T - S:T] = v.view(B, S, kv_heads, hd).transpose(1, 2)
        g = num_heads // kv_heads
        qg = q.view(B, S, kv_heads, g, hd).permute(0, 2, 3, 1, 4)  # [B,Hkv,g,S,hd]
        scores = torch.matmul(qg.float(), key[:, :, None, :T].float().transpose(-1, -2)) * scale  # [B,Hkv,g,S,T]
        probs = torch.softmax(scores + bias[:, :, None].float(), dim=-1)
        out = torch.matmul(probs, value[:, :, None, :T].float()).to(q.dtype)  # [B,Hkv,g,S,hd]
        out = out.permute(0, 3, 1, 2, 4).reshape(B, S, num_heads * hd)
        return out, key, value, probs.reshape(B, num_heads, S, T).to(q.dtype)

    @staticmethod
    def symbolic(g, q, k, v, cache_key, cache_value, bias, num_heads, kv_heads, scale):
        # every row counts as full length: seqlens_k = T - 1 (int32 [B]), total_sequence_length = T
        shape = g.op("Shape", bias)
        batch = g.op("Gather", shape, g.op("Constant", value_t=torch.tensor([0])))  # int64 [1]
        T = g.op("Cast", g.op("Gather", shape, g.op("Constant", value_t=torch.tensor(3))), to_i=6)  # int32 []
        one = g.op("Constant", value_t=torch.tensor(1, dtype=torch.int32))
        seqlens = g.op("Expand", g.op("Sub", T, one), batch)  # int32 [B]
        empty = g.op("prim::Constant")  # an omitted optional input
        empty.setType(torch._C.OptionalType.ofTensor())
        out, key, value, probs = g.op(
            "com.microsoft::GroupQueryAttention", q, k, v, cache_key, cache_value, seqlens, T, empty, empty, empty,
            bias, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale, do_rotary_i=0, qk_output_i=2, causal_i=0,
            outputs=4)
        out.setType(q.type())
        key.setType(cache_key.type().with_sizes([None] * 4))
        value.setType(cache_value.type().with_sizes([None] * 4))
        probs.setType(q.type().with_sizes([None] * 4))
        return out, key, value, probs


def rope_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """RoPE on x [B,S,heads*hd] (heads side by side, no reshape) with float32 cos/sin [B,1,S,hd]:
    the same numbers as ``apply_rope`` on [B,heads,S,hd] (rotate_half is a gather with signs)."""
    hd = cos.shape[-1]
    half = hd // 2
    perm = torch.cat([torch.arange(half, hd), torch.arange(half)])  # rotate_half's order in one head
    index = (perm[None] + hd * torch.arange(heads)[:, None]).reshape(-1).to(x.device)  # [heads*hd]
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).repeat(heads).to(x.device)  # [heads*hd]
    cos_f, sin_f = cos[:, 0], sin[:, 0]  # [B,S,hd]
    if heads > 1:  # (a no-op repeat trips the TorchScript exporter's peephole pass)
        cos_f, sin_f = cos_f.repeat(1, 1, heads), sin_f.repeat(1, 1, heads)  # [B,S,heads*hd]
    x32 = x.float()
    return (x32 * cos_f + x32.index_select(-1, index) * (sin_f * sign)).to(x.dtype)


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module):
    """Within the block every :class:`Attention` of ``module`` runs :meth:`Attention.forward_fused`
    (restored on exit)."""
    from .modules import Attention

    attns = [m for m in module.modules() if isinstance(m, Attention)]
    for m in attns:
        m.fused = True
    try:
        yield module
    finally:
        for m in attns:
            m.fused = False


def fused_part(part):
    """The fused variant of a segment :class:`~dyvte.exporter.parts.Part`: the same module and
    names, past/present over a ``capacity`` axis (static cache), example caches larger than T."""
    from .parts import Part, TensorSpec

    def static(t):
        if t.name.startswith(("past.", "present.")):
            return TensorSpec(t.name, [t.shape[0], t.shape[1], "capacity", t.shape[3]], t.dtype)
        return t

    example = dict(zip((t.name for t in part.inputs), part.example))
    T = example["attention_mask"].shape[1]
    capacity = T + 2  # slots beyond T exist and are never read
    g = torch.Generator().manual_seed(7)
    for name, p in example.items():
        if name.startswith("past."):
            example[name] = torch.cat([p, torch.randn(*p.shape[:2], capacity - p.shape[2], p.shape[3],
                                                      generator=g).to(p.dtype)], 2)
    return Part(part.name, part.kind, part.module, [static(t) for t in part.inputs], [static(t) for t in part.outputs],
                tuple(example[t.name] for t in part.inputs), {**part.info, "graph": FUSED})


def static_cache_runner(run, spare: int = 3):
    """Adapt ``run(feeds) -> outputs`` of a fused segment graph to the plain graph's contract (past
    [B,Hkv,P,hd] in, present [B,Hkv,P+S,hd] out), for validation: each past is placed in a buffer
    of P + S + ``spare`` slots whose other slots hold NaN, so a graph that read a slot it must not
    would fail validation; presents are cut to their first T slots."""

    def adapted(feeds):
        feeds = dict(feeds)
        T = feeds["attention_mask"].shape[1]
        for name, past in list(feeds.items()):
            if name.startswith("past."):
                B, H, P, hd = past.shape
                buf = torch.full((B, H, T + spare, hd), float("nan"), dtype=past.dtype)
                buf[:, :, :P] = past
                feeds[name] = buf
        outs = run(feeds)
        return [o[:, :, :T] if o.dim() == 4 else o for o in outs]

    return adapted


def save_sharing(model, path, plain_path) -> list:
    """Save a traced fused graph whose weights are the plain graph's at ``plain_path``: every
    initializer that the plain graph stores externally (same name, type, shape and bytes, checked)
    points into the plain graph's data file, so the weights are on disk once; small constants stay
    inline. Returns the written path."""
    from pathlib import Path

    import onnx

    from dyvte.engines.files import inside, write_atomic
    from dyvte.errors import ExportError

    path, plain_path = Path(path), Path(plain_path)
    plain = {i.name: i for i in onnx.load(plain_path, load_external_data=False).graph.initializer
             if i.data_location == onnx.TensorProto.EXTERNAL}
    handles = {}
    try:
        for init in model.graph.initializer:
            ref = plain.get(init.name)
            if ref is None:
                continue
            info = {e.key: e.value for e in ref.external_data}
            loc = info["location"]
            f = handles.get(loc) or handles.setdefault(loc, open(inside(plain_path.parent, loc), "rb"))
            f.seek(int(info.get("offset", 0)))
            stored = f.read(int(info["length"]))
            if (list(init.dims) != list(ref.dims) or init.data_type != ref.data_type
                    or onnx.numpy_helper.to_array(init).tobytes() != stored):
                raise ExportError(f"{path.name}: weight {init.name} differs from {plain_path.name}'s; please report it")
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for e in ref.external_data:
                init.external_data.add(key=e.key, value=e.value)
    finally:
        for f in handles.values():
            f.close()
    write_atomic(path, model.SerializeToString())
    return [path]
