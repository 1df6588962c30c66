"""An independent PyTorch implementation of the DyVTE exit semantics on the HF model.

Written directly on Hugging Face modules (no dyvte code; image features from the HF model's own
``get_image_features`` on the processor's tensors): greedy decoding without a KV cache,
recomputing the whole sequence each step. Layers < K see every token; before layer K the
visual positions are removed; the other tokens keep their position ids; generated tokens are
appended at the full-length positions. Recomputing without a cache is equivalent to the cache
semantics (layers < K cache visual keys, layers >= K do not) because attention is causal.

M-RoPE models (Qwen-VL): positions are HF's own ``get_rope_index`` rows [3,1,T]; an exit keeps
the remaining columns of all three rows; generated tokens continue at T + step + rope delta in
every row, as HF ``generate`` does.

Pruning (:class:`TokenPlan`) generalises the exit into "which tokens each layer sees": DivPrune
picks among the merged input embeddings' visual rows before layer 0 (float64 cosine distances,
plain-Python greedy), FastV at layer K ranks the visual tokens present by HF's own eager
attention weights of layer K-1 (the last prompt token's row, mean over heads). The kept sets are
chosen once, on the prompt, and reused for every generated token. Only prompts with text after
their image tokens exit or prune.

Gemma 3: each layer's mask is the contract's rule on the tokens present: causal in sequence order,
or inside one image (HF's ``get_block_sequence_ids_for_mask`` of the processor's
``token_type_ids``: each run of image tokens is one image), and in the config's sliding layers
q_pos - k_pos < sliding_window over the original positions; each layer type with its own HF rotary
table. Qwen3-VL: HF's DeepStack features (``get_image_features``) are added after layer i to the
visual tokens still present. (The cache-free recomputation stays equivalent: the masks never let a
key depend on a later token outside its own image block, and image blocks are whole or gone.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _vision(vision):
    """The processor's image tensors as keyword arguments of ``get_image_features`` (a bare tensor
    is LLaVA-1.5's pixel_values; token-level tensors such as mm_token_type_ids are left out)."""
    kw = dict(vision) if isinstance(vision, dict) else {"pixel_values": vision}
    kw.pop("mm_token_type_ids", None)
    kw.pop("token_type_ids", None)
    return kw


def _positions(model, input_ids, vision):
    """(position ids of the prompt: [1,T], or HF's M-RoPE rows [3,1,T]; the first generated
    token's position: T for 1-D RoPE, T + rope delta for M-RoPE)."""
    T = input_ids.shape[1]
    if not hasattr(model.model, "get_rope_index"):
        return torch.arange(T)[None], T
    image = (input_ids == model.config.image_token_id).int()
    grids = _vision(vision).get("image_grid_thw") if image.any() else None
    pos, delta = model.model.get_rope_index(input_ids, image, image_grid_thw=grids)
    return pos, T + int(delta)


def _append(positions, position: int):
    """Positions [..., S] -> [..., S+1] with ``position`` in every row."""
    return torch.cat([positions, torch.full((*positions.shape[:-1], 1), position)], -1)


def _merged_embeddings(model, input_ids, vision, prompt_len=None):
    """Embeddings with image features at the image-token positions of the first ``prompt_len``
    tokens (default all: teacher-forced answer tokens after it are never visual) and those positions."""
    embeds, image, _ = _merged_inputs(model, input_ids, vision, prompt_len)
    return embeds, image


def _merged_inputs(model, input_ids, vision, prompt_len=None):
    """:func:`_merged_embeddings` and the DeepStack features at the image positions [1,T,k,D]
    (None without DeepStack)."""
    ids = input_ids.clone()
    image = ids == model.config.image_token_id
    if prompt_len is not None:
        image[:, prompt_len:] = False
    ids[image] = 0
    embeds = model.get_input_embeddings()(ids)
    deepstack = None
    if image.any():
        kw = _vision(vision)
        kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
        out = model.model.get_image_features(**kw, return_dict=True)
        feats = out.pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds[image] = feats.to(embeds.dtype)
        if getattr(out, "deepstack_features", None):
            layers = [torch.cat(list(f)) for f in out.deepstack_features]  # per layer [n,D]
            deepstack = embeds.new_zeros(*image.shape, len(layers), embeds.shape[-1])
            deepstack[image] = torch.stack(layers, 1).to(embeds.dtype)
    return embeds, image, deepstack


def _groups(model, input_ids, vision, image):
    """[1,T] image block of each token (-1: not an image token): Gemma 3's own grouping of its
    processor's token_type_ids; None for families without bidirectional image attention."""
    if model.config.model_type != "gemma3":
        return None
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    types = vision.get("token_type_ids") if isinstance(vision, dict) else None
    types = torch.as_tensor(types).reshape(1, -1) if types is not None else image.long()
    types = torch.cat([types, torch.zeros(1, input_ids.shape[1] - types.shape[1], dtype=types.dtype)], 1)
    return get_block_sequence_ids_for_mask(types)


def _layer_mask(config, layer, pos, groups, dtype):
    """Additive mask [1,1,S,S] of decoder layer ``layer`` among the tokens present (their original
    1-D positions ``pos`` [S], image blocks ``groups`` [S] or None)."""
    S = pos.shape[-1]
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    if groups is not None:
        allowed |= (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        allowed &= pos[:, None] - pos[None, :] < config.sliding_window
    return torch.zeros(1, 1, S, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class TokenPlan:
    """Which visual tokens each layer sees: the exit layer (L: none), DivPrune's drop share before
    layer 0 (None: none) and FastV stages {K: drop share}."""

    exit_layer: int
    divprune: float | None = None
    fastv: dict = field(default_factory=dict)

    @classmethod
    def from_spec(cls, exit_layer: int, spec: str | None) -> "TokenPlan":
        """From a prune spec string: ``divprune:R``, ``fastv:K:R``, comma-joined."""
        plan = cls(exit_layer)
        for item in (spec or "").split(","):
            f = item.strip().split(":")
            if f[0] == "divprune":
                plan.divprune = float(f[1])
            elif f[0] == "fastv":
                plan.fastv[int(f[1])] = float(f[2])
        return plan


def kept_count(n: int, share: float) -> int:
    return round(n * (1 - share))


def divprune_pick(features, share: float) -> list[int]:
    """Kept rows of features [n,D] (indices, ascending): 1 - cos in float64; first the row whose
    nearest other row is farthest, then the row whose nearest picked row is farthest; ties: the
    earlier row."""
    x = features.double()
    x = x / x.norm(dim=-1, keepdim=True)
    dist = (1 - x @ x.T).tolist()
    n, k = len(dist), kept_count(len(dist), share)
    if k == 0:
        return []
    if n == 1:
        return [0]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < k:
        to_picked = [min(dist[i][j] for j in picked) for i in range(n)]
        picked.append(max((i for i in range(n) if i not in picked), key=lambda i: (to_picked[i], -i)))
    return sorted(picked)


def fastv_pick(scores, share: float) -> list[int]:
    """Kept tokens (indices, ascending) of scores [n]: the highest; ties: the earlier."""
    scores = [float(v) for v in scores]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[: kept_count(len(scores), share)])


def forward_plan(model, embeds, positions, visual, plan: TokenPlan, chosen: dict | None = None, groups=None,
                 deepstack=None):
    """Run the text decoder on one sequence [1,S,D] (prompt first, then generated tokens) with the
    tokens ``plan`` leaves at each layer, each layer with the family's mask among them (``groups``
    [1,S]: Gemma 3's image blocks; ``deepstack`` [1,S,k,D]: Qwen3-VL's features, added after layer
    i to the visual tokens still present). ``chosen`` {stage: kept original columns} from an
    earlier call on the same prompt (None: choose now; the sequence must then be the prompt alone).

    Returns (logits of the last position, [(hidden entering layer i [1,S_i,D], original columns
    [S_i])] per layer, chosen); the final state is in ``chosen["out"]`` (hidden [1,S',D], positions)."""
    lm = model.model.language_model
    cfg = lm.config
    S = embeds.shape[1]
    first = chosen is None
    chosen = {} if first else chosen
    if first:
        vis0 = visual[0]
        last_visual = int(vis0.nonzero().max()) if vis0.any() else -1
        chosen["exitable"] = 0 <= last_visual < S - 1  # an image and text after it
    exitable = chosen["exitable"]
    state = {"x": embeds, "pos": positions, "vis": visual[0].clone(), "cols": torch.arange(S), "groups": groups,
             "deepstack": deepstack}

    def restrict(keep):  # keep [S_present] bool
        state.update(x=state["x"][:, keep], pos=state["pos"][..., keep], vis=state["vis"][keep],
                     cols=state["cols"][keep])
        for name in ("groups", "deepstack"):
            if state[name] is not None:
                state[name] = state[name][:, keep]

    def prune(stage, scores_of):
        if stage not in chosen:
            idx = state["vis"].nonzero()[:, 0]
            picked = scores_of(idx)
            chosen[stage] = set(state["cols"][idx[picked]].tolist()) if picked else set()
        restrict(~state["vis"] | torch.tensor([int(c) in chosen[stage] for c in state["cols"]], dtype=torch.bool))

    weights = {}
    hooks = [lm.layers[k - 1].self_attn.register_forward_hook(lambda m, a, out, k=k: weights.__setitem__(k, out[1]))
             for k in plan.fastv] if first else []
    entering = []
    try:
        if exitable and plan.divprune is not None and plan.exit_layer > 0:
            prune("divprune", lambda idx: divprune_pick(state["x"][0, idx], plan.divprune))
        for i, layer in enumerate(lm.layers):
            if exitable and i == plan.exit_layer:
                restrict(~state["vis"])
            elif exitable and i in plan.fastv and i < plan.exit_layer:
                # HF eager weights of layer i-1 [1,H,S,S]: the last prompt token's row, mean over heads
                prune(i, lambda idx: fastv_pick(weights[i][0, :, -1].float().mean(0)[idx], plan.fastv[i]))
            x, pos = state["x"], state["pos"]
            entering.append((x, state["cols"]))
            flat = pos.reshape(-1, pos.shape[-1])[0]  # 1-D positions (row t with M-RoPE)
            g = state["groups"]
            mask = _layer_mask(cfg, i, flat, None if g is None else g[0], x.dtype)
            if cfg.model_type == "gemma3_text":  # one rotary table per layer type
                cos_sin = lm.rotary_emb(x, pos, cfg.layer_types[i])
            else:
                cos_sin = lm.rotary_emb(x, pos)
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
            ds, vis = state["deepstack"], state["vis"]
            if ds is not None and i < ds.shape[2] and vis.any():
                x = x.clone()
                x[:, vis] = x[:, vis] + ds[:, vis, i]
            state["x"] = x
    finally:
        for h in hooks:
            h.remove()
    chosen["out"] = (state["x"], state["pos"])
    logits = model.lm_head(lm.norm(state["x"][:, -1:]))[0, -1]
    return logits, entering, chosen


def forward_with_exit(model, embeds, positions, visual, exit_layer, return_hidden=False, groups=None, deepstack=None):
    """Run the text decoder on one sequence [1,S,D]; drop visual positions before ``exit_layer``
    (``groups``, ``deepstack``: see :func:`forward_plan`).

    Returns logits of the last position and (optionally) the hidden states entering each layer.
    """
    logits, entering, _ = forward_plan(model, embeds, positions, visual, TokenPlan(exit_layer), None, groups,
                                       deepstack)
    return (logits, [x for x, _ in entering]) if return_hidden else logits


def _generate(model, embeds, positions, first, visual, groups, deepstack, plan, max_new_tokens, eos_ids):
    """The greedy loop on a prepared prompt under ``plan`` (a :class:`TokenPlan` or an exit layer);
    generated tokens are text, at ``first`` + step in every position row."""
    plan = plan if isinstance(plan, TokenPlan) else TokenPlan(plan)
    tokens, logits_out, chosen = [], [], None
    for step in range(max_new_tokens):
        logits, _, chosen = forward_plan(model, embeds, positions, visual, plan, chosen, groups, deepstack)
        tok = int(logits.argmax())
        tokens.append(tok)
        logits_out.append(logits)
        if tok in eos_ids:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        positions = _append(positions, first + step)
        visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
        if groups is not None:  # generated tokens are text
            groups = torch.cat([groups, torch.full((1, 1), -1, dtype=groups.dtype)], 1)
        if deepstack is not None:
            deepstack = torch.cat([deepstack, deepstack.new_zeros(1, 1, *deepstack.shape[2:])], 1)
    return tokens, torch.stack(logits_out)


@torch.no_grad()
def generate_with_plan(model, input_ids, vision, plan: TokenPlan, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits [n,V] under ``plan`` (kept sets chosen on the prompt;
    ``vision``: the processor's image tensors; ``prompt_len``: see :func:`_merged_embeddings`)."""
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision, prompt_len)
    positions, first = _positions(model, input_ids, vision)
    groups = _groups(model, input_ids, vision, visual)
    return _generate(model, embeds, positions, first, visual, groups, deepstack, plan, max_new_tokens, eos_ids)


def generate_with_exit(model, input_ids, vision, exit_layer, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits with all visual tokens removed before ``exit_layer``."""
    return generate_with_plan(model, input_ids, vision, TokenPlan(exit_layer), max_new_tokens, eos_ids, prompt_len)


@torch.no_grad()
def gate_exit(model, gates, candidates, input_ids, vision, threshold=0.5, prune: str | None = None):
    """Expected gate decision (paper Eq. 1 on HF hidden states, computed with the tokens ``prune``
    leaves before each candidate): (exit layer, {layer: p_exit})."""
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision)
    L = model.config.text_config.num_hidden_layers
    plan = TokenPlan.from_spec(L, prune)
    _, entering, chosen = forward_plan(model, embeds, _positions(model, input_ids, vision)[0], visual, plan, None,
                                       _groups(model, input_ids, vision, visual), deepstack)
    if not chosen["exitable"]:
        return L, {}
    last_visual = int(visual[0].nonzero().max())
    probs = {}
    for k in candidates:
        h, cols = entering[k]  # input of layer k = output of layer k-1
        text = h[0, cols > last_visual].double()
        mean = text[:-1].mean(0) if len(text) > 1 else text[-1]
        f = torch.cat([mean, text[-1]])
        w1, w2 = (w.double() for w in gates[k])
        p = torch.softmax(torch.nn.functional.gelu(f @ w1.T) @ w2.T, -1)
        probs[k] = float(p[1])
        if p[1] > threshold:
            return k, probs
    return L, probs


@torch.no_grad()
def teacher_forced(model, input_ids, vision, exit_layer):
    """All-position logits of one teacher-forced sequence [1,T] exiting at ``exit_layer``, and the
    original position of each output row (visual positions vanish after an exit)."""
    lm = model.model.language_model
    embeds, visual, deepstack = _merged_inputs(model, input_ids, vision)
    _, _, chosen = forward_plan(model, embeds, _positions(model, input_ids, vision)[0], visual, TokenPlan(exit_layer),
                                None, _groups(model, input_ids, vision, visual), deepstack)
    x, pos = chosen["out"]
    return model.lm_head(lm.norm(x))[0], pos.reshape(-1, pos.shape[-1])[0]
