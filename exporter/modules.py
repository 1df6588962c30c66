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
:meth:`Attention.forward_fused`). Projection weights are stored [in, out] (:class:`Linear`); position math (RoPE frequencies, cos/sin and the rotation),
RMSNorm and softmax run in float32 whatever the activation dtype. The torch backend runs the
same modules through ``forward_static`` (preallocated caches, fused attention).
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

    @property
    def rope_rows(self) -> int:
        """Position-id rows per token: 3 for M-RoPE, else 1."""
        return 3 if self.mrope_section else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextSpec":
        data = dict(data)
        if data.get("mrope_section") is not None:
            data["mrope_section"] = tuple(int(x) for x in data["mrope_section"])
        return cls(**data)


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

        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [B,S,(H+2Hkv)*hd]
        q, k, v = qkv[..., : h * hd], qkv[..., h * hd: (h + hkv) * hd], qkv[..., (h + hkv) * hd:]
        q, k = rope_flat(q, cos, sin, h), rope_flat(k, cos, sin, hkv)
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
    """A pre-norm Llama-family decoder layer (HF names, fused qkv and gate/up projections)."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, bias, past_key, past_value, last: bool = False):
        """-> (x, key, value), or (x, last-query attention [B,T], key, value) with ``last``."""
        out = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_key, past_value, last)
        x = x + out[0]
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, *out[1:])

    def forward_static(self, x, cos, sin, allowed, cache_key, cache_value, index, length=None, last: bool = False):
        out = self.self_attn.forward_static(self.input_layernorm(x), cos, sin, allowed, cache_key, cache_value, index,
                                            length, last)
        attn, scores = out if last else (out, None)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
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


def attention_bias(attention_mask: torch.Tensor, query_len, start=None) -> torch.Tensor:
    """Additive float32 mask [B,1,1,S,T] of :func:`attention_allowed`. A fully masked row (a
    left-padding query) gets equal scores, never NaN."""
    bias = torch.where(attention_allowed(attention_mask, query_len, start), 0.0, torch.finfo(torch.float32).min)
    return bias[:, None, None]


class Float32Frequencies(nn.Module):
    """A module whose ``inv_freq`` buffer stays float32 under ``.to(dtype)`` / ``.half()`` (an fp16
    inv_freq is off by whole radians at positions in the thousands); it follows device moves."""

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.device.type != "meta" or self.inv_freq.device.type == "meta":
            self.inv_freq = inv_freq.to(self.inv_freq.device, torch.float32)
        return self


def mrope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor, section) -> torch.Tensor:
    """M-RoPE angles: position_ids [3,B,S] (t, h, w) -> float32 [B,S,hd/2]; frequency chunk i of
    ``section`` (sizes summing to hd/2) takes its positions from row i % 3."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3,B,S,hd/2]
    chunks, at = [], 0
    for i, n in enumerate(section):
        chunks.append(freqs[i % 3, ..., at: at + n])  # [B,S,n]
        at += n
    return torch.cat(chunks, dim=-1)


class DecoderSegment(Float32Frequencies):
    """Decoder layers [start, end) with KV cache in and out (see module docstring)."""

    def __init__(self, spec: TextSpec, start: int, end: int, inv_freq: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.start, self.end = spec, start, end
        self.layers = nn.ModuleDict({str(i): DecoderLayer(spec) for i in range(start, end)})
        if inv_freq is None:
            inv_freq = torch.zeros(spec.rope_dim // 2)
        self.register_buffer("inv_freq", inv_freq.float().clone())

    def rope(self, position_ids: torch.Tensor):
        # position_ids: [B,S] (or [3,B,S] with M-RoPE) -> float32 cos/sin [B,1,S,hd], whatever the
        # activation dtype
        if self.spec.mrope_section:
            freqs = mrope_angles(position_ids, self.inv_freq, self.spec.mrope_section)  # [B,S,hd/2]
        else:
            freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B,S,hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.spec.attention_scaling
        return (emb.cos() * scale)[:, None], (emb.sin() * scale)[:, None]

    @property
    def scores(self) -> bool:
        """Whether the segment returns ``attention_last`` (the FastV scores of a stage at its end
        layer): every segment but the last."""
        return self.end < self.spec.num_layers

    def forward(self, hidden_states, position_ids, attention_mask, *past):
        cos, sin = self.rope(position_ids)
        bias = attention_bias(attention_mask, hidden_states.shape[1])
        x, present, n = hidden_states, [], len(self.layers)
        scores = []
        for i, layer in enumerate(self.layers.values()):
            last = self.scores and i == n - 1
            x, *out = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1], last)
            scores += out[:-2]
            present += out[-2:]
        return (x, *scores, *present)

    def forward_static(self, hidden_states, position_ids, attention_mask, caches, start, length=None,
                       scores: bool = False, keys: dict | None = None, data: dict | None = None):
        """The same computation on preallocated caches (torch backend, CUDA graphs).

        attention_mask [B,C] covers every cache slot; caches: [(key, value)] per layer, each
        [B,Hkv,C,hd]; the S new tokens are written at slots start..start+S-1 (``start`` an int64
        tensor); attention spans the first ``length`` slots (None: all, unused ones masked).
        ``scores``: also return ``attention_last`` [B,length or C]. ``keys`` (key-side inputs per
        slot, [B,C]) and ``data`` (token-aligned inputs, [B,S,...]) are the graph's other inputs;
        this decoder layout takes none.
        """
        S = hidden_states.shape[1]
        index = start + torch.arange(S, device=hidden_states.device)  # [S]
        mask = attention_mask if length is None else attention_mask[:, :length]
        cos, sin = self.rope(position_ids)
        allowed = attention_allowed(mask, S, start, self_always=True)  # [B,S,T]
        x, n, last_attn = hidden_states, len(caches), None
        for i, (layer, (key, value)) in enumerate(zip(self.layers.values(), caches)):
            if scores and i == n - 1:
                x, last_attn = layer.forward_static(x, cos, sin, allowed, key, value, index, length, True)
            else:
                x = layer.forward_static(x, cos, sin, allowed, key, value, index, length)
        return (x, last_attn) if scores else x


class Embed(nn.Module):
    """Token embeddings: input_ids [B,S] -> [B,S,D]."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class Head(nn.Module):
    """Final RMSNorm + lm_head: hidden [B,S,D] -> float32 logits [B,S,V]."""

    def __init__(self, spec: TextSpec):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
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
