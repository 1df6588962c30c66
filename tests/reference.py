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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _vision(vision):
    """The processor's image tensors as keyword arguments of ``get_image_features`` (a bare tensor
    is LLaVA-1.5's pixel_values; token-level tensors such as mm_token_type_ids are left out)."""
    kw = dict(vision) if isinstance(vision, dict) else {"pixel_values": vision}
    kw.pop("mm_token_type_ids", None)
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
    tokens (default all: teacher-forced answer tokens after it are never visual)."""
    ids = input_ids.clone()
    image = ids == model.config.image_token_id
    if prompt_len is not None:
        image[:, prompt_len:] = False
    ids[image] = 0
    embeds = model.get_input_embeddings()(ids)
    if image.any():
        kw = _vision(vision)
        kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
        feats = model.model.get_image_features(**kw, return_dict=True).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        embeds[image] = feats.to(embeds.dtype)
    return embeds, image


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


def _causal_mask(x):
    S = x.shape[1]
    return torch.full((S, S), torch.finfo(x.dtype).min).triu(1)[None, None]


def forward_plan(model, embeds, positions, visual, plan: TokenPlan, chosen: dict | None = None):
    """Run the text decoder on one sequence [1,S,D] (prompt first, then generated tokens) with the
    tokens ``plan`` leaves at each layer. ``chosen`` {stage: kept original columns} from an earlier
    call on the same prompt (None: choose now; the sequence must then be the prompt alone).

    Returns (logits of the last position, [(hidden entering layer i [1,S_i,D], original columns
    [S_i])] per layer, chosen)."""
    lm = model.model.language_model
    S = embeds.shape[1]
    cols, vis = torch.arange(S), visual[0].clone()
    first = chosen is None
    chosen = {} if first else chosen
    if first:
        last_visual = int(vis.nonzero().max()) if vis.any() else -1
        chosen["exitable"] = 0 <= last_visual < S - 1  # an image and text after it
    exitable = chosen["exitable"]
    state = {"x": embeds, "pos": positions, "vis": vis, "cols": cols}

    def restrict(keep):  # keep [S_present] bool
        state.update(x=state["x"][:, keep], pos=state["pos"][..., keep], vis=state["vis"][keep],
                     cols=state["cols"][keep])

    def prune(stage, share, scores_of):
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
            prune("divprune", plan.divprune, lambda idx: divprune_pick(state["x"][0, idx], plan.divprune))
        for i, layer in enumerate(lm.layers):
            if exitable and i == plan.exit_layer:
                restrict(~state["vis"])
            elif exitable and i in plan.fastv and i < plan.exit_layer:
                # HF eager weights of layer i-1 [1,H,S,S]: the last prompt token's row, mean over heads
                prune(i, plan.fastv[i], lambda idx: fastv_pick(weights[i][0, :, -1].float().mean(0)[idx], plan.fastv[i]))
            x, pos = state["x"], state["pos"]
            entering.append((x, state["cols"]))
            x = layer(x, attention_mask=_causal_mask(x), position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
            state["x"] = x[0] if isinstance(x, tuple) else x
    finally:
        for h in hooks:
            h.remove()
    logits = model.lm_head(lm.norm(state["x"][:, -1:]))[0, -1]
    return logits, entering, chosen


def forward_with_exit(model, embeds, positions, visual, exit_layer, return_hidden=False):
    """Run the text decoder on one sequence [1,S,D]; drop visual positions before ``exit_layer``.

    Returns logits of the last position and (optionally) the hidden states entering each layer.
    """
    logits, entering, _ = forward_plan(model, embeds, positions, visual, TokenPlan(exit_layer))
    return (logits, [x for x, _ in entering]) if return_hidden else logits


@torch.no_grad()
def generate_with_plan(model, input_ids, vision, plan: TokenPlan, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits [n,V] under ``plan`` (kept sets chosen on the prompt;
    ``prompt_len``: see :func:`_merged_embeddings`)."""
    embeds, visual = _merged_embeddings(model, input_ids, vision, prompt_len)
    positions, first = _positions(model, input_ids, vision)
    tokens, logits_out, chosen = [], [], None
    for step in range(max_new_tokens):
        logits, _, chosen = forward_plan(model, embeds, positions, visual, plan, chosen)
        tok = int(logits.argmax())
        tokens.append(tok)
        logits_out.append(logits)
        if tok in eos_ids:
            break
        embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        positions = _append(positions, first + step)
        visual = torch.cat([visual, torch.zeros(1, 1, dtype=torch.bool)], 1)
    return tokens, torch.stack(logits_out)


def generate_with_exit(model, input_ids, vision, exit_layer, max_new_tokens, eos_ids=(), prompt_len=None):
    """Greedy tokens and their logits with all visual tokens removed before ``exit_layer``
    (``vision``: the processor's image tensors; ``prompt_len``: see :func:`_merged_embeddings`)."""
    return generate_with_plan(model, input_ids, vision, TokenPlan(exit_layer), max_new_tokens, eos_ids, prompt_len)


@torch.no_grad()
def gate_exit(model, gates, candidates, input_ids, vision, threshold=0.5, prune: str | None = None):
    """Expected gate decision (paper Eq. 1 on HF hidden states, computed with the tokens ``prune``
    leaves before each candidate): (exit layer, {layer: p_exit})."""
    embeds, visual = _merged_embeddings(model, input_ids, vision)
    L = model.config.text_config.num_hidden_layers
    plan = TokenPlan.from_spec(L, prune)
    _, entering, chosen = forward_plan(model, embeds, _positions(model, input_ids, vision)[0], visual, plan)
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
    embeds, visual = _merged_embeddings(model, input_ids, vision)
    x, pos, vis = embeds, _positions(model, input_ids, vision)[0], visual
    for i, layer in enumerate(lm.layers):
        if i == exit_layer:
            keep = ~vis[0]
            x, pos, vis = x[:, keep], pos[..., keep], vis[:, keep]
        S = x.shape[1]
        mask = torch.full((S, S), torch.finfo(x.dtype).min).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        x = x[0] if isinstance(x, tuple) else x
    return model.lm_head(lm.norm(x))[0], pos.reshape(-1, pos.shape[-1])[0]
