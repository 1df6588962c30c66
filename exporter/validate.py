"""Check every exported part against the Hugging Face PyTorch model.

The reference side never uses dyvte's modules: decoder segments are compared with the HF
decoder layers (HF rotary embeddings, eager attention, a plain list cache), vision with
``get_image_features``, the head with HF's norm + lm_head, the gate with Eq. 1 in float64.
"""

from __future__ import annotations

import copy

import torch

from dyvte.errors import ValidationError
from dyvte.settings import TOLERANCES

from . import hf


def compare(part: str, output: str, ours, ref, dtype: str, keep=None, tolerance: str | None = None) -> float:
    """Max abs error of ``ours`` vs ``ref`` (rows where ``keep`` is true); raises when too large.
    ``tolerance``: the :data:`TOLERANCES` key when not ``dtype`` (a quantization scheme)."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    if ours.shape != ref.shape:
        raise ValidationError(f"{part}: output {output} has shape {tuple(ours.shape)}, PyTorch gives {tuple(ref.shape)}")
    if keep is not None:
        ours, ref = ours[keep], ref[keep]
    if not torch.isfinite(ours).all():
        raise ValidationError(f"{part}: output {output} has NaN/inf where PyTorch is finite; re-export in float32")
    err = float((ours - ref).abs().max()) if ours.numel() else 0.0
    key = tolerance or dtype
    atol, rtol = TOLERANCES[key]
    tol = atol + rtol * float(ref.abs().max() if ref.numel() else 0.0)
    if err > tol:
        fix = ("the exported graph is wrong for this model: please report it with the model config" if key == dtype else
               f"{key} quantization loses too much on this model: export without --quantize or with --quantize int8")
        raise ValidationError(f"{part}: output {output} differs from PyTorch by {err:.3g} (tolerance {tol:.3g} for "
                              f"{key}); {fix}")
    return err


class _ListCache:
    """The minimal cache interface HF attention calls: update(k, v, layer_idx)."""

    def __init__(self, past: dict):
        self.past, self.present = past, {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        pk, pv = self.past[layer_idx]
        k, v = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        self.present[layer_idx] = (k, v)
        return k, v


def hf_allowed(spec, layer: int, attention_mask, query_len: int, key_positions=None, token_groups=None):
    """The full model's mask rule for decoder layer ``layer`` among the keys given, bool [B,S,T]:
    key padding and causal in cache order, or (``token_groups`` [B,T]) the query's own image, and in
    sliding layers ``q_pos - k_pos < sliding_window`` over ``key_positions`` [B,T] (the last S keys
    are the queries)."""
    T, S = attention_mask.shape[1], query_len
    pad = attention_mask.bool()[:, None, :]  # [B,1,T]
    q = torch.arange(S) + (T - S)
    allowed = (torch.arange(T)[None, :] <= q[:, None])[None] & pad
    if token_groups is not None and spec.image_bidirectional:
        qg = token_groups[:, T - S:, None]
        allowed = allowed | ((qg == token_groups[:, None, :]) & (qg > 0) & pad)
    if spec.sliding(layer):
        qp = key_positions[:, T - S:, None]
        allowed = allowed & (qp - key_positions[:, None, :] < spec.sliding_window)
    return allowed


def hf_rotary(rotary_emb, hidden, position_ids, layer_type: str):
    """HF's cos/sin for one layer type (Gemma 3's rotary embedding keeps a table per type)."""
    import inspect

    if "layer_type" in inspect.signature(rotary_emb.forward).parameters:
        return rotary_emb(hidden, position_ids, layer_type)
    return rotary_emb(hidden, position_ids)


def hf_segment(layers: dict, rotary_emb, hidden, position_ids, attention_mask, past, spec, key_positions=None,
               token_groups=None, deepstack=None):
    """HF decoder layers {index: layer} with the model's mask (key padding + causal, and for
    families that have them an image's bidirectional block and sliding windows: :func:`hf_allowed`),
    HF's rotary embedding per layer type, DeepStack adds after layers i < n and a list cache ->
    (hidden, present, the last query's head-mean attention probabilities [B,T] in the last layer,
    from HF's own eager attention weights)."""
    B, S, _ = hidden.shape
    cache = _ListCache(past)
    x = hidden
    weights = []
    rope = {}
    hook = list(layers.values())[-1].self_attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    try:
        for i, layer in layers.items():
            allowed = hf_allowed(spec, i, attention_mask, S, key_positions, token_groups)
            kind = "sliding_attention" if spec.sliding(i) else "full_attention"
            if kind not in rope:
                rope[kind] = hf_rotary(rotary_emb, hidden, position_ids, kind)
            mask = torch.zeros(B, 1, S, attention_mask.shape[1], dtype=hidden.dtype)
            mask = mask.masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
            x = layer(x, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=True, position_embeddings=rope[kind])
            x = x[0] if isinstance(x, tuple) else x
            if deepstack is not None and i < spec.deepstack_layers:
                x = x + deepstack[:, :, i]  # HF adds at the visual positions; deepstack is 0 elsewhere
    finally:
        hook.remove()
    last = weights[-1][:, :, -1].float().mean(1) if weights and weights[-1] is not None else None  # [B,T]
    return x, cache.present, last


def _f32(module):
    """The module itself when float32, else a float32 copy (references stay in float32)."""
    return module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()


def _f32_view(model, paths):
    """A shallow copy of ``model`` whose submodules/parameters at ``paths`` ("model.vision_tower")
    are float32 copies: the vision side's reference in float32, the original untouched."""
    view = copy.copy(model)
    for path in paths:
        parent, names = view, path.split(".")
        for name in names[:-1]:  # copy the chain of parents so the original keeps its children
            child = copy.copy(getattr(parent, name))
            child._modules, child._parameters = dict(child._modules), dict(child._parameters)
            if parent is view:
                view._modules = dict(view._modules)
            parent._modules[name] = child
            parent = child
        leaf = getattr(parent, names[-1])
        if isinstance(leaf, torch.nn.Parameter):
            parent._parameters[names[-1]] = torch.nn.Parameter(leaf.detach().float(), requires_grad=False)
        else:
            parent._modules[names[-1]] = _f32(leaf)
    return view


def _segment_cases(spec, dtype, max_position: int):
    g = torch.Generator().manual_seed(0)
    d = spec.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    # prefill with left padding, decode after a cache, text-only with gapped positions, and the
    # folder's longest positions (RoPE rounding shows there, not at 30)
    # (token groups: image numbers of the keys, for families with bidirectional image blocks)
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, :2] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    top = max_position
    ones = torch.ones
    yield "prefill", rand(2, 7, d), pos, mask, 0, torch.tensor([[0, 1, 1, 1, 0, 2, 2], [0, 0, 0, 1, 1, 1, 0]])
    yield "decode", rand(2, 1, d), torch.tensor([[9], [7]]), ones(2, 10, dtype=torch.int64), 9, \
        torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0, 0, 0]] * 2)
    yield "gapped", rand(1, 5, d), torch.tensor([[0, 1, 2, 30, 31]]), ones(1, 5, dtype=torch.int64), 0, \
        torch.tensor([[0, 1, 1, 1, 0]])
    yield "long", rand(1, 6, d), torch.tensor([[0, 1, 2, top - 2, top - 1, top]]), ones(1, 6, dtype=torch.int64), 0, \
        torch.tensor([[0, 1, 1, 2, 2, 0]])
    yield "long decode", rand(1, 1, d), torch.tensor([[top]]), ones(1, 9, dtype=torch.int64), 8, \
        torch.tensor([[0, 1, 1, 1, 1, 2, 2, 0, 0]])


def _position_rows(pos, spec, top: int):
    """The segment graph's position ids for 1-D ids [B,S]: unchanged, or three distinct (t, h, w)
    rows [3,B,S] for M-RoPE (every row stays within [0, top], the t row reaches top)."""
    if spec.rope_rows == 1:
        return pos
    return torch.stack([pos, pos.flip(-1), (pos * 7) % (top + 1)])


def validate_segment(part, session_run, model, dtype: str, max_position: int, tolerance: str | None = None) -> float:
    start, end = part.info["layers"]
    spec = part.module.spec
    lm = hf.text_model(model)
    layers = {i: _f32(lm.layers[i]) for i in range(start, end)}
    rotary = copy.deepcopy(lm.rotary_emb).float()
    tdt = getattr(torch, dtype)
    worst = 0.0
    names = {t.name for t in part.inputs}
    for case, hidden, pos, mask, P, groups in _segment_cases(spec, dtype, max_position):
        B, S = hidden.shape[:2]
        T = P + S
        key_pos = (pos[:, -1:] - (T - 1) + torch.arange(T)).clamp(min=0)  # the past counts up to the queries
        key_pos[:, P:] = pos
        pos = _position_rows(pos, spec, max_position)
        g = torch.Generator().manual_seed(P + 1)
        past = {
            i: tuple(torch.randn(hidden.shape[0], spec.num_kv_heads, P, spec.head_dim, generator=g).to(tdt) for _ in range(2))
            for i in range(start, end)
        }
        hidden = hidden.to(tdt)
        groups = groups * mask  # no image at padding
        deepstack = None
        if "deepstack" in names:  # features at the prompt's visual positions (here: every other token), 0 elsewhere
            deepstack = torch.randn(B, S, spec.deepstack_layers, spec.hidden_size, generator=g).to(tdt)
            deepstack = deepstack * (torch.arange(S) % 2 == 0)[None, :, None, None].to(tdt) * mask[:, P:, None, None]
        feeds = {"hidden_states": hidden, "position_ids": pos, "attention_mask": mask}
        for name, value in (("key_positions", key_pos), ("token_groups", groups), ("deepstack", deepstack)):
            if name in names:
                feeds[name] = value
        for i in range(start, end):
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = past[i]
        outs = dict(zip((t.name for t in part.outputs), session_run(feeds)))
        ref_h, present, ref_last = hf_segment(layers, rotary, hidden.float(), pos, mask,
                                              {i: (k.float(), v.float()) for i, (k, v) in past.items()}, spec, key_pos,
                                              groups, None if deepstack is None else deepstack.float())
        name = f"{part.name} ({case})"
        rows = mask[:, -hidden.shape[1]:].bool()
        worst = max(worst, compare(name, "hidden_states_out", outs["hidden_states_out"], ref_h, dtype, rows, tolerance))
        keys = mask.bool()
        if "attention_last" in outs:
            worst = max(worst, compare(name, "attention_last", outs["attention_last"], ref_last, dtype, keys, tolerance))
        for i in range(start, end):
            for kind, ref in zip(("key", "value"), present[i]):
                ours = outs[f"present.{i}.{kind}"].transpose(1, 2)  # [B,T,Hkv,hd]: the mask selects positions
                worst = max(worst, compare(name, f"present.{i}.{kind}", ours, ref.transpose(1, 2), dtype, keys, tolerance))
    return worst


def gate_reference(gates: dict, layer: int, hidden, text_mask):
    """Eq. 1 in float64: p = softmax(GELU([mean(text[:-1]), text[-1]] W1^T) W2^T)."""
    w1, w2 = (w.double() for w in gates[layer])
    probs = []
    for b in range(hidden.shape[0]):
        h = hidden[b].double()
        text = h[text_mask[b].bool()]
        last = h[-1]
        mean = text.mean(0) if len(text) else last
        f = torch.cat([mean, last])
        probs.append(torch.softmax(torch.nn.functional.gelu(f @ w1.T) @ w2.T, -1))
    return torch.stack(probs)


def validate(part, session_run, model, dtype: str, gates: dict | None = None, max_position: int = 2047,
             vision_meta: dict | None = None, tolerance: str | None = None) -> float:
    """Run the exported graph (``session_run(feeds) -> list of tensors``) against PyTorch;
    decoder segments also at ``max_position``, the largest position the folder allows; the vision
    part on the family's cases (``vision_meta``: its facts and limits). ``tolerance``: the
    :data:`TOLERANCES` key of a quantized graph (its scheme) instead of ``dtype``."""
    tdt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if part.kind == "segment":
            return validate_segment(part, session_run, model, dtype, max_position, tolerance)
        if part.kind == "embed":
            ids = torch.randint(0, part.module.embed_tokens.num_embeddings, (2, 7), generator=g)
            ref = hf.text_model(model).embed_tokens(ids)
            return compare(part.name, "inputs_embeds", session_run({"input_ids": ids})[0], ref, dtype)
        if part.kind == "head":
            hidden = torch.randn(2, 3, part.module.lm_head.in_features, generator=g).to(tdt)
            ref = _f32(model.lm_head)(_f32(hf.text_model(model).norm)(hidden.float()))
            return compare(part.name, "logits", session_run({"hidden_states": hidden})[0], ref, dtype,
                           tolerance=tolerance)
        if part.kind == "vision":
            family = hf.family_of(model)
            worst = 0.0
            for case, feeds, ref in family.vision_cases(_f32_view(model, family.vision_paths), part, vision_meta or {}, g):
                name = f"{part.name} ({case})" if case else part.name
                worst = max(worst, compare(name, part.outputs[0].name, session_run(feeds)[0], ref, dtype))
            return worst
        if part.kind == "gate":
            d = part.module.fc1.shape[2] // 2
            hidden = torch.randn(3, 6, d, generator=g).to(tdt)
            text_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0]])
            worst = 0.0
            for idx, layer in enumerate(part.info["layers"]):
                ours = session_run({"hidden_states": hidden, "text_mask": text_mask, "gate_index": torch.tensor(idx)})[0]
                ref = gate_reference(gates, layer, hidden.float(), text_mask)
                worst = max(worst, compare(f"gate (layer {layer})", "probs", ours, ref, "float32"))
            return worst
    raise ValueError(part.kind)


#: Prompts of the end-to-end check of a quantized folder (any tokenizer encodes them).
QUANT_CHECK_TEXT = ("what color is the circle ?", "how many red squares are there in the picture ?",
                    "is there a blue triangle on the left ?")


def validate_quantized(engine_dir, model, scheme: str) -> dict:
    """A quantized folder against the float Hugging Face model, end to end: greedy decoding with
    policy never on synthetic prompts (random images), and HF's float logits teacher-forced on the
    same tokens. Returns the logit error (max abs, and relative to the largest float logit) and
    the greedy-token agreement (share of generated positions where the float model's argmax is the
    quantized folder's token)."""
    import numpy as np

    from dyvte.runtime import Pipeline
    from dyvte.settings import QUANT_CHECK_PROMPTS, QUANT_CHECK_TOKENS

    from PIL import Image

    agree = total = 0
    err = rel = 0.0
    with Pipeline.load(engine_dir, backend="onnxruntime", verify=False) as pipe:
        n_new = min(QUANT_CHECK_TOKENS, pipe.manifest.limits["max_new_tokens"])
        for i in range(QUANT_CHECK_PROMPTS):
            image = Image.fromarray((np.random.RandomState(i).rand(96, 96, 3) * 255).astype("uint8"))
            req = pipe.encode(image, QUANT_CHECK_TEXT[i % len(QUANT_CHECK_TEXT)], max_new_tokens=n_new)
            res = pipe.run([req], policy="never", return_logits=True)[0]
            ids = torch.as_tensor(req.input_ids)[None]
            tokens = list(res.token_ids)
            image_id = pipe.manifest.model["image_token_id"]
            if image_id in tokens:  # HF would take a generated image token for a placeholder: stop after it
                tokens = tokens[: tokens.index(image_id) + 1]
            T, n = ids.shape[1], len(tokens)
            full = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=ids.dtype)], 1)
            vision = {"pixel_values": torch.as_tensor(req.pixel_values), **{k: torch.as_tensor(v) for k, v in req.extra.items()}}
            for k, v in vision.items():  # token-aligned processor outputs (mm_token_type_ids) cover the answer too
                if k != "pixel_values" and v.dim() == 2 and v.shape == (1, T):
                    vision[k] = torch.cat([v, v.new_zeros(1, n - 1)], 1)
            with torch.no_grad():
                logits = model(input_ids=full, attention_mask=torch.ones_like(full), **vision).logits[0, T - 1: T - 1 + n]
            ref = logits.float()
            ours = torch.as_tensor(np.asarray(res.logits)).float()[:n]
            agree += int((ref.argmax(-1) == torch.tensor(tokens)).sum())
            total += n
            e = float((ours - ref).abs().max())
            err, rel = max(err, e), max(rel, e / max(float(ref.abs().max()), 1e-12))
    if total == 0 or not np.isfinite(err):
        raise ValidationError(f"the {scheme} folder gives NaN/inf logits; export without --quantize")
    return {"scheme": scheme, "prompts": QUANT_CHECK_PROMPTS, "tokens": total, "greedy_agreement": agree / total,
            "logit_max_abs_err": err, "logit_rel_err": rel}
