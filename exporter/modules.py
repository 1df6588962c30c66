"""The computations dyvte exports, as small torch modules.

These modules are the single definition of every exported part: the exporter traces them to
ONNX, and the torch backend runs them directly. Parameter names follow the Hugging Face
checkpoint (``layers.3.input_layernorm.weight``, ``norm.weight``, ...) except two fused
projections: ``self_attn.qkv_proj`` (q, k, v stacked on the output axis) and
``mlp.gate_up_proj`` (gate, up), one GEMM each instead of three and two (see
:func:`layer_state_from_hf`).

A decoder segment runs layers [start, end) of the text model on any token sequence (full or
text-only, prefill or decode) with an explicit KV cache:

    hidden_states [B,S,D], position_ids [B,S], attention_mask [B,P+S], past.{i}.key/value [B,Hkv,P,hd]
    -> hidden_states_out [B,S,D], attention_last [B,P+S] (not in the last segment),
       present.{i}.key/value [B,Hkv,P+S,hd]

``attention_last``: the attention probabilities the last query gives every key in the segment's
last layer, averaged over query heads, float32 (FastV's scores for a pruning stage at the segment's
end layer; 0 at masked keys).

Attention is plain MatMul/Softmax (no If/Loop, no ONNX Attention op); the causal part of the
mask is built inside from P = T - S. Traced under ``exporter.fused.fused_attention`` the same
modules give ONNX Runtime's fused graphs (GroupQueryAttention with an in-place static cache:
:meth:`Attention.forward_fused`). Projection weights are stored [in, out] (:class:`Linear`).
Position math (RoPE frequencies, cos/sin and the rotation), RMSNorm and softmax run in float32 whatever the activation dtype. The torch backend runs the
same modules through ``forward_static`` (preallocated caches, fused attention).

One decoder implementation serves every family; :class:`TextSpec` switches what differs: q/k
RMSNorm (Qwen3, Gemma 3), RMSNorm scaled by (1 + w) and norms on the attention and MLP outputs
(Gemma 3), an embedding scale, the attention logit scale, interleaved M-RoPE (Qwen3-VL), per-layer
attention types with a sliding window and their own RoPE table (Gemma 3), bidirectional attention
among an image's tokens (Gemma 3) and DeepStack adds (Qwen3-VL). Segments whose layers need them
take more inputs (:func:`segment_extra_inputs`), after ``attention_mask``:

    key_positions [B,P+S] int64   1-D position of every key (sliding-window layers)
    token_groups  [B,P+S] int64   image number 1, 2, ... of every visual token, 0 elsewhere
    deepstack     [B,S,n,D]       the n DeepStack features at the visual positions, 0 elsewhere

The rule for all of them: the mask among the tokens present at a layer is the full model's mask
restricted to them. A key is seen when it is not padding and comes before the query in cache
order or belongs to the query's image, and, in a sliding layer, ``q_pos - k_pos < sliding_window``
(positions, not cache slots: an exit or pruning removes tokens, not positions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextSpec:
    """Shape and options of the text decoder, enough to rebuild every text-side module."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    rope_dim: int  # rotary dims (head_dim unless partial rotary)
    attention_scaling: float  # RoPE cos/sin scale (1.0 except for yarn/longrope-style types)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    mrope_section: tuple[int, ...] | None = None  # M-RoPE: frequency slots per (t, h, w) chunk; None = 1-D RoPE
    # Qwen3-VL's layout: slot j takes row h when j % 3 == 1 and j < 3 * section[1], w when j % 3 == 2
    # and j < 3 * section[2], else t (instead of contiguous chunks)
    mrope_interleaved: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight), in float32 (Gemma: 1.0)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, 4 per layer (Gemma 3)
    embed_scale: float | None = None  # embeddings x this, in the weight dtype (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # attention logit scale; None: head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5)
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" or "sliding_attention"; None: all full
    sliding_window: int | None = None  # a sliding layer's query sees keys with q_pos - k_pos < sliding_window
    sliding_rope_scaling: float = 1.0  # RoPE cos/sin scale of the sliding layers (their own table, inv_freq_sliding)
    image_bidirectional: bool = False  # an image's tokens attend to each other in both directions (Gemma 3)
    deepstack_layers: int = 0  # DeepStack: layer i < n adds the i-th vision feature at the visual positions

    @property
    def rope_rows(self) -> int:
        """Position-id rows per token: 3 for M-RoPE, else 1."""
        return 3 if self.mrope_section else 1

    def sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends in a sliding window."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextSpec":
        data = dict(data)
        if data.get("layer_types") is not None:
            data["layer_types"] = tuple(data["layer_types"])
        if data.get("mrope_section") is not None:
            data["mrope_section"] = tuple(int(x) for x in data["mrope_section"])
        return cls(**data)


def segment_extra_inputs(spec: TextSpec, start: int, end: int) -> list[str]:
    """Inputs segment [start, end) takes besides hidden_states, position_ids, attention_mask and
    the cache, in graph order (see module docstring)."""
    names = []
    if any(spec.sliding(i) for i in range(start, end)):
        names.append("key_positions")
    if spec.image_bidirectional:
        names.append("token_groups")
    if start < spec.deepstack_layers:
        names.append("deepstack")
    return names


class Linear(nn.Module):
    """y = x @ weight + bias with ``weight`` [in, out]: the layout ONNX MatMul consumes, so exported
    graphs feed each weight initializer straight into its MatMul (no Transpose on the weight path,
    which ONNX Runtime's quantizers need). Hugging Face's ``nn.Linear`` weight is ``weight.T``
    (:func:`linear_state_from_hf`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)  # [..., in] @ [in, out]
        return y if self.bias is None else y + self.bias


def linear_state_from_hf(state: dict, prefix: str = "") -> dict:
    """An ``nn.Linear`` state dict ({prefix}weight [out, in], bias) in :class:`Linear`'s layout."""
    out = dict(state)
    w = prefix + "weight"
    if w in out:
        out[w] = out[w].t().contiguous()
    return out


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in float32 (as Hugging Face does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (offset + weight), all in float32, cast back at the end."""

    def __init__(self, size: int, eps: float, offset: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).to(x.dtype)


def make_norm(spec: TextSpec, size: int) -> nn.Module:
    """The decoder's RMSNorm of width ``size``: Llama's, or (1 + w)-scaled when ``spec.norm_offset``."""
    if spec.norm_offset:
        return OffsetRMSNorm(size, spec.rms_norm_eps, spec.norm_offset)
    return RMSNorm(size, spec.rms_norm_eps)


def _act(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B,H,S,hd] by float32 cos/sin [B,1,S,hd]; the rotation is computed in float32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class Attention(nn.Module):
    fused = False  # trace :meth:`forward_fused` instead of :meth:`forward` (exporter.fused.fused_attention)

    def __init__(self, spec: TextSpec):
        super().__init__()
        d, h, hkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.scaling = hd**-0.5
        self.qkv_proj = Linear(d, (h + 2 * hkv) * hd, bias=spec.qkv_bias)
        self.o_proj = Linear(h * hd, d, bias=spec.o_bias)

    def project(self, x, cos, sin):
        """x [B,S,D] -> rotated q [B,H,S,hd], rotated k and v [B,Hkv,S,hd]."""
        B, S = x.shape[0], x.shape[1]
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = q.reshape(B, S, h, hd).transpose(1, 2)  # [B,H,S,hd]
        k = k.reshape(B, S, hkv, hd).transpose(1, 2)  # [B,Hkv,S,hd]
        v = v.reshape(B, S, hkv, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, key, value, bias, last: bool = False):
        """q [B,H,S,hd] over key/value [B,Hkv,T,hd] with bias [B,1,1,S,T] -> [B,S,D] (and, with
        ``last``, the last query's attention probabilities averaged over heads [B,T] float32)."""
        B, h, S, hd = q.shape
        hkv = self.num_kv_heads
        T, g = key.shape[2], h // hkv
        # Grouped-query attention without repeating K/V: query heads of one KV head share a row block.
        qg = q.reshape(B, hkv, g * S, hd)  # head j*g+i -> group j
        scores = torch.matmul(qg, key.transpose(2, 3)) * self.scaling  # [B,Hkv,g*S,T]
        scores = scores.view(B, hkv, g, S, T).float() + bias  # [B,Hkv,g,S,T] float32
        probs32 = torch.softmax(scores, dim=-1)
        probs = probs32.to(value.dtype).view(B, hkv, g * S, T)
        out = torch.matmul(probs, value)  # [B,Hkv,g*S,hd]
        out = self.o_proj(out.view(B, h, S, hd).transpose(1, 2).reshape(B, S, h * hd))
        if not last:
            return out
        return out, probs32[:, :, :, -1].mean(dim=(1, 2))  # [B,T]

    def last_attention(self, q, key, allowed_last):
        """The last query's attention probabilities averaged over heads, [B,T] float32, from q
        [B,H,S,hd], key [B,Hkv,T,hd] and the keys it may see, allowed_last [B,T] (bool): the
        same numbers :meth:`attend` returns, for the fused path (whose kernel keeps no probabilities)."""
        B, h, S, hd = q.shape
        hkv, T = self.num_kv_heads, key.shape[2]
        qg = q[:, :, -1:].reshape(B, hkv, h // hkv, hd)  # [B,Hkv,g,hd]
        scores = torch.matmul(qg, key.transpose(2, 3)).float() * self.scaling  # [B,Hkv,g,T]
        scores = scores.masked_fill(~allowed_last[:, None, None], torch.finfo(torch.float32).min)
        return torch.softmax(scores, dim=-1).mean(dim=(1, 2))

    def forward(self, x, cos, sin, bias, past_key, past_value, last: bool = False):
        # x: [B,S,D]; cos/sin: [B,1,S,hd]; bias: [B,1,1,S,T] float32; past: [B,Hkv,P,hd]
        if self.fused:
            return self.forward_fused(x, cos, sin, bias, past_key, past_value, last)
        q, k, v = self.project(x, cos, sin)
        key = torch.cat([past_key, k], dim=2)  # [B,Hkv,T,hd]
        value = torch.cat([past_value, v], dim=2)
        out = self.attend(q, key, value, bias, last)
        return (*out, key, value) if last else (out, key, value)

    def forward_fused(self, x, cos, sin, bias, cache_key, cache_value, last: bool = False):
        """:meth:`forward` as ONNX Runtime's GroupQueryAttention with an in-place static cache
        (exporter/fused.py): cache_key/cache_value [B,Hkv,C,hd] (C >= T) hold the T - S cached
        tokens, the S new ones are written at T-S..T-1 and the buffers are returned as present."""
        from .fused import GroupQueryAttention, mask_value, rope_flat

        h, hkv = self.num_heads, self.num_kv_heads
        q, k, v = self.project_flat(x, cos, sin, rope_flat)
        bias = bias[:, 0]  # [B,1,S,T]
        if x.dtype != torch.float32:
            bias = torch.where(bias < 0, mask_value(x.dtype), 0.0).to(x.dtype)
        out, key, value, probs = GroupQueryAttention.apply(q, k, v, cache_key, cache_value, bias, h, hkv,
                                                           self.scaling)
        out = self.o_proj(out)
        if not last:
            return out, key, value
        last_probs = probs[:, :, -1].float()  # [B,H,T]: the last query's
        return out, (last_probs.mean(dim=1) if h > 1 else last_probs[:, 0]), key, value  # head mean [B,T]

    def project_flat(self, x, cos, sin, rope_flat):
        """x [B,S,D] -> rotated q [B,S,H*hd], rotated k and v [B,S,Hkv*hd] (the fused op's layout)."""
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [B,S,(H+2Hkv)*hd]
        q, k, v = qkv[..., : h * hd], qkv[..., h * hd: (h + hkv) * hd], qkv[..., (h + hkv) * hd:]
        return rope_flat(q, cos, sin, h), rope_flat(k, cos, sin, hkv), v

    def attend_fused(self, q, key, value, allowed):
        """q [B,H,S,hd] over key/value [B,Hkv,T,hd] where allowed [B,S,T] (bool) -> [B,S,D].

        torch's fused ``scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU,
        float32 accumulation in low precision), with the same grouping of query heads as
        :meth:`attend`, so K/V are never repeated. Every row must allow at least one key.
        """
        B, h, S, hd = q.shape
        hkv, T = self.num_kv_heads, key.shape[2]
        g = h // hkv
        qg = q.reshape(B, hkv, g * S, hd)
        mask = allowed[:, None, None].expand(B, 1, g, S, T).reshape(B, 1, g * S, T)
        out = nn.functional.scaled_dot_product_attention(qg, key, value, attn_mask=mask, scale=self.scaling)
        out = out.view(B, h, S, hd).transpose(1, 2).reshape(B, S, h * hd)  # [B,S,H*hd]
        return self.o_proj(out)

    def forward_static(self, x, cos, sin, allowed, cache_key, cache_value, index, length=None, last: bool = False):
        """Like forward, with preallocated caches [B,Hkv,C,hd] written in place at ``index`` [S]
        and fused attention; attends over the first ``length`` slots (None: all C, the unused
        ones excluded by ``allowed`` [B,S,length or C]). ``last``: also the last query's head-mean
        attention [B,length or C] (see :meth:`last_attention`)."""
        q, k, v = self.project(x, cos, sin)
        cache_key.index_copy_(2, index, k)
        cache_value.index_copy_(2, index, v)
        key, value = (cache_key, cache_value) if length is None else (cache_key[:, :, :length], cache_value[:, :, :length])
        out = self.attend_fused(q, key, value, allowed)
        return (out, self.last_attention(q, key, allowed[:, -1])) if last else out


class QKNormAttention(Attention):
    """Attention with a per-head RMSNorm of q and k (``q_norm``, ``k_norm`` on head_dim) before RoPE."""

    def __init__(self, spec: TextSpec):
        super().__init__(spec)
        self.q_norm = make_norm(spec, spec.head_dim)
        self.k_norm = make_norm(spec, spec.head_dim)

    def project(self, x, cos, sin):
        """x [B,S,D] -> normed and rotated q [B,H,S,hd], k and v [B,Hkv,S,hd]."""
        B, S = x.shape[0], x.shape[1]
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        q = self.q_norm(q.reshape(B, S, h, hd)).transpose(1, 2)  # [B,H,S,hd]
        k = self.k_norm(k.reshape(B, S, hkv, hd)).transpose(1, 2)  # [B,Hkv,S,hd]
        v = v.reshape(B, S, hkv, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_flat(self, x, cos, sin, rope_flat):
        """:meth:`project` in the fused op's [B,S,heads*hd] layout (the norms come first)."""
        B, S = x.shape[0], x.shape[1]
        return tuple(t.transpose(1, 2).reshape(B, S, -1) for t in self.project(x, cos, sin))


class MLP(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        d, m = spec.hidden_size, spec.intermediate_size
        self.gate_up_proj = Linear(d, 2 * m, bias=spec.mlp_bias)
        self.down_proj = Linear(m, d, bias=spec.mlp_bias)
        self.act_fn = _act(spec.hidden_act)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def layer_state_from_hf(state: dict) -> dict:
    """A Hugging Face decoder layer's state dict in this module's layout (fused projections,
    :class:`Linear` weights [in, out])."""
    out = dict(state)
    for kind in ("weight", "bias"):
        qkv = [out.pop(f"self_attn.{p}_proj.{kind}", None) for p in "qkv"]
        if qkv[0] is not None:
            out[f"self_attn.qkv_proj.{kind}"] = torch.cat(qkv, dim=0)
        gu = [out.pop(f"mlp.{p}_proj.{kind}", None) for p in ("gate", "up")]
        if gu[0] is not None:
            out[f"mlp.gate_up_proj.{kind}"] = torch.cat(gu, dim=0)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        out = linear_state_from_hf(out, name + ".")
    return out


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer (HF names, fused qkv and gate/up projections): Llama's, with q/k
    norms (``spec.qk_norm``) and, for Gemma 3, norms on the attention and MLP outputs too."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        d = spec.hidden_size
        self.input_layernorm = make_norm(spec, d)
        self.self_attn = QKNormAttention(spec) if spec.qk_norm else Attention(spec)
        if spec.attn_scale is not None:
            self.self_attn.scaling = spec.attn_scale
        self.post_attention_layernorm = make_norm(spec, d)  # Llama: the MLP's input norm; Gemma: the attention output's
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(spec, d)
            self.post_feedforward_layernorm = make_norm(spec, d)
        self.mlp = MLP(spec)

    def _add(self, x, attn):
        """The residual adds after attention output ``attn``: x + attn, then the MLP block."""
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def forward(self, x, cos, sin, bias, past_key, past_value, last: bool = False):
        """-> (x, key, value), or (x, last-query attention [B,T], key, value) with ``last``."""
        out = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_key, past_value, last)
        return (self._add(x, out[0]), *out[1:])

    def forward_static(self, x, cos, sin, allowed, cache_key, cache_value, index, length=None, last: bool = False):
        out = self.self_attn.forward_static(self.input_layernorm(x), cos, sin, allowed, cache_key, cache_value, index,
                                            length, last)
        attn, scores = out if last else (out, None)
        x = self._add(x, attn)
        return (x, scores) if last else x


def attention_allowed(attention_mask: torch.Tensor, query_len, start=None, self_always: bool = False) -> torch.Tensor:
    """Which keys each query sees, bool [B,S,T], from key padding [B,T]; causal over cache order.

    Query s sits at cache index start + s (default start = T - S) and sees keys j <= that
    index whose mask is 1. ``self_always``: a query also sees its own slot, so that no row is
    empty (a left-padding query; fused kernels give NaN on empty rows).
    """
    T = attention_mask.shape[1]
    dev = attention_mask.device
    q_idx = torch.arange(query_len, device=dev) + (T - query_len if start is None else start)  # [S]
    k_idx = torch.arange(T, device=dev)  # [T]
    allowed = (k_idx[None, :] <= q_idx[:, None])[None] & attention_mask[:, None, :].bool()  # [B,S,T]
    if self_always:
        allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    return allowed


def layer_allowed(attention_mask, query_len, start=None, self_always: bool = False, window=None, positions=None,
                  groups=None) -> torch.Tensor:
    """:func:`attention_allowed` with the family rules (see module docstring): ``groups`` (q [B,S],
    k [B,T] image numbers, 0 = not visual) also lets a query see its own image's keys in either
    direction; ``window`` with ``positions`` (q [B,S], k [B,T]) keeps keys with q_pos - k_pos < window."""
    allowed = attention_allowed(attention_mask, query_len, start)  # [B,S,T]
    if groups is not None:
        q_grp, k_grp = groups
        same = (q_grp[:, :, None] == k_grp[:, None, :]) & (q_grp > 0)[:, :, None]
        allowed = allowed | (same & attention_mask[:, None, :].bool())
    if window is not None:
        q_pos, k_pos = positions
        allowed = allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    if self_always:
        T = attention_mask.shape[1]
        q_idx = torch.arange(query_len, device=attention_mask.device) + (T - query_len if start is None else start)
        allowed = allowed | (torch.arange(T, device=attention_mask.device)[None, :] == q_idx[:, None])[None]
    return allowed


def bias_of(allowed: torch.Tensor) -> torch.Tensor:
    """Additive float32 mask [B,1,1,S,T] of allowed [B,S,T] (0 or the float32 minimum)."""
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None, None]


def attention_bias(attention_mask: torch.Tensor, query_len, start=None) -> torch.Tensor:
    """Additive float32 mask [B,1,1,S,T] of :func:`attention_allowed`. A fully masked row (a
    left-padding query) gets equal scores, never NaN."""
    bias = torch.where(attention_allowed(attention_mask, query_len, start), 0.0, torch.finfo(torch.float32).min)
    return bias[:, None, None]


class Float32Frequencies(nn.Module):
    """A module whose ``inv_freq`` buffers (``inv_freq``, ``inv_freq_sliding``) stay float32 under
    ``.to(dtype)`` / ``.half()`` (an fp16 inv_freq is off by whole radians at positions in the
    thousands); they follow device moves."""

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if n.startswith("inv_freq") and b is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if before.device.type != "meta" or after.device.type == "meta":
                self._buffers[name] = before.to(after.device, torch.float32)
        return self


def mrope_rows(section, slots: int) -> list[int]:
    """Interleaved M-RoPE (Qwen3-VL): the position row (0 t, 1 h, 2 w) of each frequency slot."""
    return [1 if j % 3 == 1 and j < 3 * section[1] else 2 if j % 3 == 2 and j < 3 * section[2] else 0
            for j in range(slots)]


def mrope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor, section, rows=None) -> torch.Tensor:
    """M-RoPE angles: position_ids [3,B,S] (t, h, w) -> float32 [B,S,hd/2]; frequency chunk i of
    ``section`` (sizes summing to hd/2) takes its positions from row i % 3, or, with ``rows``
    [hd/2] int64 (interleaved: :func:`mrope_rows`), slot j from row rows[j]."""
    if rows is not None:
        picked = position_ids.index_select(0, rows)  # [hd/2,B,S]: each slot's position row
        return picked.permute(1, 2, 0).float() * inv_freq.float()  # [B,S,hd/2]
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3,B,S,hd/2]
    chunks, at = [], 0
    for i, n in enumerate(section):
        chunks.append(freqs[i % 3, ..., at: at + n])  # [B,S,n]
        at += n
    return torch.cat(chunks, dim=-1)


class DecoderSegment(Float32Frequencies):
    """Decoder layers [start, end) with KV cache in and out (see module docstring)."""

    def __init__(self, spec: TextSpec, start: int, end: int, inv_freq: torch.Tensor | None = None,
                 inv_freq_sliding: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.start, self.end = spec, start, end
        self.layers = nn.ModuleDict({str(i): DecoderLayer(spec) for i in range(start, end)})
        if inv_freq is None:
            inv_freq = torch.zeros(spec.rope_dim // 2)
        self.register_buffer("inv_freq", inv_freq.float().clone())
        self.kinds = ["sliding" if spec.sliding(i) else "full" for i in range(start, end)]  # per layer
        if "sliding" in self.kinds:  # sliding layers rotate with their own table (Gemma 3: local base, unscaled)
            sliding = torch.zeros(spec.rope_dim // 2) if inv_freq_sliding is None else inv_freq_sliding
            self.register_buffer("inv_freq_sliding", sliding.float().clone())
        if spec.mrope_interleaved:  # a buffer, not a constant made per call: CUDA graphs cannot capture H2D copies
            self.register_buffer("mrope_rows", torch.tensor(mrope_rows(spec.mrope_section, spec.rope_dim // 2)))
        self.extra_inputs = segment_extra_inputs(spec, start, end)
        # the Llama/Qwen layout: one causal mask and one RoPE table for every layer
        self.plain = not self.extra_inputs or self.extra_inputs == ["deepstack"]

    def rope(self, position_ids: torch.Tensor, kind: str = "full"):
        # position_ids: [B,S] (or [3,B,S] with M-RoPE) -> float32 cos/sin [B,1,S,hd], whatever the
        # activation dtype; ``kind`` "sliding": the sliding layers' table
        inv_freq = self.inv_freq_sliding if kind == "sliding" else self.inv_freq
        if self.spec.mrope_section:
            rows = self.mrope_rows if self.spec.mrope_interleaved else None
            freqs = mrope_angles(position_ids, inv_freq, self.spec.mrope_section, rows)  # [B,S,hd/2]
        else:
            freqs = position_ids[..., None].float() * inv_freq.float()  # [B,S,hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.spec.sliding_rope_scaling if kind == "sliding" else self.spec.attention_scaling
        return (emb.cos() * scale)[:, None], (emb.sin() * scale)[:, None]

    @property
    def scores(self) -> bool:
        """Whether the segment returns ``attention_last`` (the FastV scores of a stage at its end
        layer): every segment but the last."""
        return self.end < self.spec.num_layers

    def _masks(self, attention_mask, position_ids, keys: dict, S: int, start=None, self_always=False) -> dict:
        """{kind: allowed [B,S,T]} for the kinds of layer in this segment (family rules): the query
        positions are ``position_ids`` (row t with M-RoPE), the query groups the last S keys' when
        ``start`` is None, else the keys' at slots start..start+S-1."""
        q_pos = position_ids if position_ids.dim() == 2 else position_ids[0]  # [B,S]
        groups = None
        if "token_groups" in keys:
            k_grp = keys["token_groups"]
            if start is None:
                q_grp = k_grp[:, k_grp.shape[1] - S:]
            else:
                q_grp = k_grp.index_select(1, start + torch.arange(S, device=k_grp.device))
            groups = (q_grp, k_grp)
        masks = {}
        for kind in sorted(set(self.kinds)):
            window = self.spec.sliding_window if kind == "sliding" else None
            masks[kind] = layer_allowed(attention_mask, S, start, self_always, window,
                                        (q_pos, keys.get("key_positions")), groups)
        return masks

    def _deepstack(self, index: int, x, deepstack):
        """DeepStack: after layer ``index`` < n, add its feature (0 at non-visual positions)."""
        if deepstack is None or index >= self.spec.deepstack_layers:
            return x
        return x + deepstack[:, :, index].to(x.dtype)

    def forward(self, hidden_states, position_ids, attention_mask, *inputs):
        # inputs: the extra inputs (self.extra_inputs), then past.{i}.key/value [B,Hkv,P,hd] per layer
        n_extra = len(self.extra_inputs)
        extra, past = dict(zip(self.extra_inputs, inputs[:n_extra])), inputs[n_extra:]
        if self.plain:
            cos, sin = self.rope(position_ids)
            per_kind = {"full": (cos, sin, attention_bias(attention_mask, hidden_states.shape[1]))}
        else:
            masks = self._masks(attention_mask, position_ids, extra, hidden_states.shape[1])
            per_kind = {kind: (*self.rope(position_ids, kind), bias_of(allowed)) for kind, allowed in masks.items()}
        x, present, n = hidden_states, [], len(self.layers)
        scores = []
        for i, (index, layer) in enumerate(self.layers.items()):
            cos, sin, bias = per_kind[self.kinds[i]]
            last = self.scores and i == n - 1
            x, *out = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1], last)
            x = self._deepstack(int(index), x, extra.get("deepstack"))
            scores += out[:-2]
            present += out[-2:]
        return (x, *scores, *present)

    def forward_static(self, hidden_states, position_ids, attention_mask, caches, start, length=None,
                       scores: bool = False, keys: dict | None = None, data: dict | None = None):
        """The same computation on preallocated caches (torch backend, CUDA graphs).

        attention_mask [B,C] covers every cache slot; caches: [(key, value)] per layer, each
        [B,Hkv,C,hd]; the S new tokens are written at slots start..start+S-1 (``start`` an int64
        tensor); attention spans the first ``length`` slots (None: all, unused ones masked).
        ``scores``: also return ``attention_last`` [B,length or C]. ``keys``: key-side inputs per
        slot ([B,C]: ``key_positions``, ``token_groups``, as in the graph); ``data``: token-aligned
        inputs ([B,S,...]: ``deepstack``; absent = zeros, as for decode tokens).
        """
        S = hidden_states.shape[1]
        index = start + torch.arange(S, device=hidden_states.device)  # [S]
        mask = attention_mask if length is None else attention_mask[:, :length]
        if self.plain:
            rope = {"full": self.rope(position_ids)}
            allowed = {"full": attention_allowed(mask, S, start, self_always=True)}  # [B,S,T]
        else:
            keys = {k: (v if length is None else v[:, :length]) for k, v in (keys or {}).items()}
            allowed = self._masks(mask, position_ids, keys, S, start, self_always=True)
            rope = {kind: self.rope(position_ids, kind) for kind in allowed}
        deepstack = (data or {}).get("deepstack")
        x, n, last_attn = hidden_states, len(caches), None
        for i, ((layer_index, layer), (key, value)) in enumerate(zip(self.layers.items(), caches)):
            kind = self.kinds[i]
            cos, sin = rope[kind]
            if scores and i == n - 1:
                x, last_attn = layer.forward_static(x, cos, sin, allowed[kind], key, value, index, length, True)
            else:
                x = layer.forward_static(x, cos, sin, allowed[kind], key, value, index, length)
            x = self._deepstack(int(layer_index), x, deepstack)
        return (x, last_attn) if scores else x


class Embed(nn.Module):
    """Token embeddings: input_ids [B,S] -> [B,S,D] (times ``spec.embed_scale`` rounded to the
    weight dtype, as Gemma does)."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.scale = spec.embed_scale

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        if self.scale is None:
            return x
        return x * torch.tensor(self.scale, dtype=torch.float32).to(x.dtype)


class Head(nn.Module):
    """Final RMSNorm + lm_head: hidden [B,S,D] -> float32 logits [B,S,V]."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.norm = make_norm(spec, spec.hidden_size)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, hidden_states):
        return self.lm_head(self.norm(hidden_states)).float()


def gate_features(hidden: torch.Tensor, text_mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 1's features [mean(text[:-1]), text[-1]] -> [B,2D] (float32 in, float32 out).

    hidden [B,S,D]; text_mask [B,S] (1 on the text tokens before the last prompt token); last [B,D]
    (the last prompt token's state). With one text token both halves are that token. Shared by
    the gate graph (runtime, left padding) and gate training (right padding)."""
    m = text_mask.to(hidden.dtype)[..., None]  # [B,S,1]
    n = m.sum(1)  # [B,1]
    mean = (hidden * m).sum(1) / torch.maximum(n, torch.ones_like(n))  # no fp64 clamp constant in the graph
    mean = torch.where(n > 0, mean, last)
    return torch.cat([mean, last], dim=-1)


class GateBank(nn.Module):
    """The DyVTE gates of every candidate layer in one module (paper Eq. 1).

    hidden_states [B,S,D] (input of the candidate layer, left-padded so the last prompt token
    is at S-1), text_mask [B,S] (1 on text tokens before the last one), gate_index [] (which
    candidate) -> probs [B,2] float32, class 1 = exit.
    """

    def __init__(self, num_gates: int, hidden: int, model_dim: int):
        super().__init__()
        self.fc1 = nn.Parameter(torch.zeros(num_gates, hidden, 2 * model_dim))
        self.fc2 = nn.Parameter(torch.zeros(num_gates, 2, hidden))

    def forward(self, hidden_states, text_mask, gate_index):
        h = hidden_states.float()
        feats = gate_features(h, text_mask, h[:, -1])  # [B,2D]; left padding: the last prompt token is at S-1
        w1 = self.fc1.float()[gate_index]  # [h,2D]
        w2 = self.fc2.float()[gate_index]  # [2,h]
        hidden = nn.functional.gelu(feats @ w1.t())  # exact (erf) GELU
        return torch.softmax(hidden @ w2.t(), dim=-1)

    @classmethod
    def from_gates(cls, gates: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: list[int]):
        """Stack per-layer (fc1 [h,2d], fc2 [2,h]) weights; smaller h are zero-padded (exact)."""
        hid = max(gates[k][0].shape[0] for k in layers)
        dim2 = gates[layers[0]][0].shape[1]
        bank = cls(len(layers), hid, dim2 // 2)
        with torch.no_grad():
            for i, k in enumerate(layers):
                w1, w2 = gates[k]
                bank.fc1[i, : w1.shape[0]] = w1.float()
                bank.fc2[i, :, : w2.shape[1]] = w2.float()
        return bank


class VisionEncoder(nn.Module):
    """Vision tower + projector: pixel_values [N,3,H,W] -> projected features [N,V,D].

    ``tower`` is the Hugging Face vision model truncated to the deepest layer the features
    come from; ``feature_layers`` are absolute hidden-state indices (0 = embeddings).
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layers: list[int], strategy: str):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.feature_layers, self.strategy = list(feature_layers), strategy

    def forward(self, pixel_values):
        dtype = next(self.projector.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        feats = [out.hidden_states[i] for i in self.feature_layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]  # drop CLS
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        return self.projector(feats)
