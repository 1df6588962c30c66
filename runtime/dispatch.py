"""The DyVTE dispatcher: which tokens each layer sees, prefill through the segments, and a decode
batch that requests join and leave at any step.

**Token plan** (:mod:`dyvte.runtime.plan`). Each row carries a :class:`~dyvte.runtime.plan.RowPlan`
(exit policy, gate threshold, pruning stages). Decisions are taken once, at prefill, at segment
boundaries: before layer 0 DivPrune and ``layer:0``; at a candidate the exit (fixed, or the gate);
at a boundary K a FastV stage (scores: the attention the last prompt token gives each key in layer
K - 1, returned by the segment ending at K). A dropped token leaves the hidden states and the KV
cache of every later layer; kept tokens keep their order and position ids ([G,S,R], R = 1 for 1-D
RoPE, 3 for M-RoPE rows t, h, w, handed to the graphs as [G,S] or [3,G,S]).

**Prefill** (:class:`Prefill`) advances new rows one segment per :meth:`Prefill.step`, so a
scheduler can interleave it with decode steps. Sequences are left-padded (every last prompt token
at the last column). In each segment the rows run in groups of one mode ("full": visual tokens
still present, "text": none) and similar length (a group's shortest row is at least half its
longest), each group a batch with its own KV cache, so a row that exited or pruned costs about
what it would cost alone.

**Decode** (:class:`DecodeBatch`): per segment, one lane per mode; a lane holds its rows' caches as
one left-padded batch (each row right-aligned at the lane's length, key padding masked), so every
row appends at the same column. Rows join (their prefill caches merged into the lanes) and leave
(taken out, leading all-padding columns trimmed) between any two steps; each row's answer is what
it is alone. Generated tokens continue at each row's next position (prompt length for 1-D RoPE,
largest M-RoPE position + 1), exit or not.

Only rows with visual tokens and at least one text token after them can exit or prune: a prompt
without an image has nothing to drop, and one that ends with its image gives the gate no text to
read and FastV no query after the image (and its last prompt token, which gives the first
generated token, must stay). Such rows run every layer with all their tokens (exit layer L, no gate
probabilities) under every policy and prune spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .plan import RowPlan, divprune_keep, fastv_keep

#: Token-aligned tensors every group carries (besides graph-specific ``data``).
BASE_FIELDS = ("hidden", "positions", "mask", "visual", "text_mask", "token_groups")

#: A prefill group's shortest row is at least this share of its longest (else it gets a group of its own).
GROUP_MIN_FILL = 0.5


@dataclass
class Group:
    """Rows sharing one layout in a segment. ``rows`` [G] (row index in the prefill batch);
    ``t``: token-aligned tensors [G,S,...]: ``hidden`` [G,S,D], ``positions`` [G,S,R] int64,
    ``mask`` [G,S] int64 (0 = left padding), ``visual`` [G,S] bool (visual tokens present),
    ``text_mask`` [G,S] int64 (the gate's text tokens before the last one), ``token_groups`` [G,S]
    int64 (image number 1, 2, ... of visual tokens, 0 elsewhere), plus graph inputs such as
    ``deepstack``."""

    rows: torch.Tensor
    t: dict
    mode: str = "full"  # "text": rows that exited (the segment's text-only profile), else "full"

    def __getattr__(self, name):
        try:
            return self.__dict__["t"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def lengths(self) -> torch.Tensor:
        return self.t["mask"].sum(1)

    def select(self, keep: torch.Tensor) -> "Group":
        """Rows ``keep`` (bool or index [G']), with leading all-padding columns trimmed."""
        rows = self.rows[keep]
        t = {k: v[keep] for k, v in self.t.items()}
        width = int(t["mask"].sum(1).max()) if len(rows) else 0
        return Group(rows, {k: v[:, v.shape[1] - width:] for k, v in t.items()}, self.mode)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros((t.shape[0], pad, *t.shape[2:])), t], dim=1)


def concat(groups: list[Group]) -> Group:
    """Groups stacked along the batch, re-padded on the left to the longest."""
    if len(groups) == 1:
        return groups[0]
    S = max(g.t["mask"].shape[1] for g in groups)
    return Group(torch.cat([g.rows for g in groups]),
                 {k: torch.cat([_pad_left(g.t[k], S) for g in groups]) for k in groups[0].t}, groups[0].mode)


def compact(g: Group, keep: torch.Tensor) -> Group:
    """Keep the tokens where ``keep`` [G,S] (bool) and the mask are set, in order, re-padded on the left."""
    keep = keep & g.t["mask"].bool()
    n = keep.sum(1)  # [G]
    S = int(n.max()) if len(n) else 0
    slot = keep.long().cumsum(1) - 1 + (S - n)[:, None]  # target column of each kept token
    row = torch.arange(len(n), device=keep.device)[:, None].expand_as(keep)
    r, c = row[keep], slot[keep]

    def move(x):
        out = x.new_zeros((len(n), S, *x.shape[2:]))
        out[r, c] = x[keep]
        return out

    t = {k: move(v) for k, v in g.t.items() if k != "mask"}
    mask = torch.zeros(len(n), S, dtype=g.t["mask"].dtype, device=keep.device)
    mask[r, c] = 1
    t["mask"] = mask
    return Group(g.rows, t, g.mode)


def partition(groups: list[Group], exited) -> list[Group]:
    """Re-form groups: one mode each ("text" for the rows in ``exited``, else "full") and similar
    lengths (see :data:`GROUP_MIN_FILL`); returns ``groups`` itself when nothing changes."""
    rows = concat(groups)
    lengths = rows.lengths.tolist()
    ids = rows.rows.tolist()
    out = []
    for mode in ("full", "text"):
        idx = sorted((i for i in range(len(ids)) if (ids[i] in exited) == (mode == "text")), key=lambda i: -lengths[i])
        while idx:
            top = lengths[idx[0]]
            take = [i for i in idx if lengths[i] >= GROUP_MIN_FILL * top]
            idx = [i for i in idx if lengths[i] < GROUP_MIN_FILL * top]
            g = rows.select(torch.tensor(sorted(take), device=rows.rows.device))
            g.mode = mode
            out.append(g)
    if len(out) == len(groups) and all(a.mode == b.mode and a.rows.tolist() == b.rows.tolist()
                                       for a, b in zip(out, groups)):
        return groups  # unchanged: keep the original tensors
    return out


@dataclass
class Batch:
    """Left-padded prompts. ids/mask/visual/text_mask/token_groups: [B,T]; positions [B,T,R];
    lengths, next_positions, exitable [B]."""

    ids: torch.Tensor
    mask: torch.Tensor
    visual: torch.Tensor
    text_mask: torch.Tensor
    lengths: torch.Tensor  # real prompt lengths
    visions: list  # per row: dyvte.families.Vision (tiles to encode, packing) or None
    exitable: torch.Tensor  # bool: visual tokens with text after them (see module docstring)
    positions: torch.Tensor = None  # [B,T,R] int64 position ids (0 at left padding)
    next_positions: torch.Tensor = None  # [B] position of each row's first generated token
    token_groups: torch.Tensor = None  # [B,T] int64 image number of each visual token, 0 elsewhere


def make_batch(prompts: list[torch.Tensor], visions: list, image_token_id: int, device, family=None,
               meta: dict | None = None) -> Batch:
    """Left-pad 1-D id tensors; mark visual positions, the gate's text tokens and each image's
    tokens (a run of visual tokens is one image); each row's position ids from ``family``
    (default: 1-D RoPE, 0..len-1)."""
    from dyvte.families import Family

    family = family or Family()
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    rows = []
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
        rows.append(family.positions(meta or {}, p == image_token_id, visions[i]))
    positions = torch.zeros(B, T, family.rope_rows, dtype=torch.int64)
    for i, (pos, _) in enumerate(rows):
        positions[i, T - len(pos):] = pos
    next_positions = torch.tensor([n for _, n in rows], dtype=torch.int64)
    visual = (ids == image_token_id) & mask.bool()
    starts = visual & ~torch.cat([torch.zeros(B, 1, dtype=torch.bool), visual[:, :-1]], 1)  # first token of a run
    token_groups = starts.long().cumsum(1) * visual
    cols = torch.arange(T)
    last_visual = torch.where(visual, cols, -1).max(1).values  # [B], -1 without image
    text_mask = ((cols[None] > last_visual[:, None]) & (cols[None] < T - 1) & mask.bool()).long()
    exitable = (last_visual >= 0) & (last_visual < T - 1)  # [B]: an image, and text after it
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    return Batch(ids.to(device), mask.to(device), visual.to(device), text_mask.to(device), lengths.to(device),
                 list(visions), exitable.to(device), positions.to(device), next_positions.to(device),
                 token_groups.to(device))


class Dispatcher:
    """Runs one engine folder's parts through a :class:`Runner` with DyVTE exits and pruning."""

    def __init__(self, runner, manifest):
        from dyvte.families import family_named

        self.runner, self.manifest = runner, manifest
        self.segments = [p.layers for p in manifest.segments]
        self.gate_index = {k: i for i, k in enumerate(manifest.gate_layers)}
        self.family = family_named(manifest.model["family"])
        self._extras = None
        std = {"hidden_states", "position_ids", "attention_mask"}
        #: per segment: key-side inputs its graph takes besides the key padding (``key_positions``,
        #: ``token_groups``) and token-aligned data inputs {name: (trailing shape, dtype)}
        self.key_inputs, self.data_inputs = [], []
        for p in manifest.segments:
            names = [i for i in p.inputs if i["name"] not in std and not i["name"].startswith("past.")]
            self.key_inputs.append([i["name"] for i in names if i["name"] in ("key_positions", "token_groups")])
            self.data_inputs.append({i["name"]: (tuple(i["shape"][2:]), i["dtype"]) for i in names
                                     if i["name"] not in ("key_positions", "token_groups")})
        self.wants_keys = any(self.key_inputs)

    def extras(self) -> dict:
        """The family's packing tensors from the folder (e.g. LLaVA-NeXT's image_newline), on the device."""
        if self._extras is None:
            rel = self.manifest.model.get("vision_extras")
            self._extras = {}
            if rel:
                from safetensors.torch import load_file

                self._extras = {k: v.to(self.runner.device) for k, v in load_file(str(self.manifest.path(rel))).items()}
        return self._extras

    def visual_features(self, visions: list):
        """Features of every row's visual tokens, in prompt order: [n,D], or a dict with ``features``
        [n,D] and token-aligned graph inputs (e.g. ``deepstack``) for families that have them. The
        family's vision calls for the batch's images (LLaVA-style: one call with every tile; Qwen-VL:
        one per image), then each row's packing."""
        visions = [v for v in visions if v is not None]
        meta, extras = self.manifest.model["vision"], self.extras()
        outputs = [self.runner.vision(feeds) for feeds in self.family.vision_calls(meta, visions)]
        packed = self.family.unpack(meta, outputs, visions, extras)
        if isinstance(packed[0], dict):
            return {k: torch.cat([p[k] for p in packed]) for k in packed[0]}
        return torch.cat(packed)

    def graph_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids [G,S,R] -> the segment graph's layout: [G,S] (1-D RoPE) or [R,G,S]."""
        return positions[..., 0] if positions.shape[-1] == 1 else positions.permute(2, 0, 1)

    def run_segment(self, j: int, hidden, positions, mask, cache, mode: str, keys: dict | None = None,
                    data: dict | None = None, scores: bool = False):
        """One call of segment ``j``: ``keys`` {name: [G,T]} and ``data`` {name: [G,S,...]} are passed
        where the graph takes them (absent data inputs are zeros: decode tokens are never visual)."""
        extra = {k: keys[k] for k in self.key_inputs[j]} if self.key_inputs[j] else {}
        for name, (shape, dtype) in self.data_inputs[j].items():
            given = (data or {}).get(name)
            if given is None:
                given = torch.zeros(*hidden.shape[:2], *shape, dtype=getattr(torch, dtype), device=hidden.device)
            extra[name] = given
        return self.runner.segment(j, hidden, self.graph_positions(positions), mask, cache, mode, extra=extra or None,
                                   scores=scores)

    def prefill(self, batch: Batch, plans: list[RowPlan], max_new: list[int]) -> "Prefill":
        """A :class:`Prefill` of ``batch`` (not started)."""
        return Prefill(self, batch, plans, max_new)


@dataclass
class CacheEntry:
    """One prefill group's cache in one segment: rows (prefill-batch indices), the runner cache,
    key padding [G,S] and, where a graph takes them, key positions / token groups [G,S]."""

    rows: list
    mode: str
    cache: object
    mask: torch.Tensor
    keys: dict


class Prefill:
    """New rows on their way through the segments, one segment per :meth:`step`.

    After the last step: ``last`` [B,1,D] (every row's last prompt token), ``entries`` (per segment,
    the :class:`CacheEntry` of each group), ``exit_layers``, ``gate_probs`` [{layer: p_exit}],
    ``tokens`` (per row, tokens present in each segment) and ``vision_s``.
    """

    def __init__(self, dispatcher: Dispatcher, batch: Batch, plans: list[RowPlan], max_new: list[int]):
        self.d, self.batch, self.plans, self.max_new = dispatcher, batch, list(plans), list(max_new)
        B = batch.ids.shape[0]
        self.L = dispatcher.manifest.num_layers
        self.exit_layers = [self.L] * B
        self.exited = [False] * B
        self.gate_probs = [{} for _ in range(B)]
        self.tokens = [[] for _ in range(B)]  # per row: tokens present in each segment
        self.entries: list[list[CacheEntry]] = []
        self.groups: list[Group] | None = None
        self.scores: dict = {}  # row -> [S] FastV scores of the keys of its group (last segment's output)
        self.j = 0
        self.vision_s = 0.0
        self.last = None

    @property
    def done(self) -> bool:
        return self.last is not None

    def next_cost(self) -> int:
        """Work of the next :meth:`step` in token-layers (rows x padded tokens x layers)."""
        if self.done:
            return 0
        a, b = self.d.segments[self.j]
        if self.groups is None:
            return int(self.batch.mask.numel()) * (b - a)
        return sum(int(g.t["mask"].numel()) for g in self.groups) * (b - a)

    # -- boundaries ----------------------------------------------------------------------------
    def _start(self) -> None:
        """Embeddings, vision, and the decisions before layer 0 (DivPrune, layer:0)."""
        d, batch, runner = self.d, self.batch, self.d.runner
        B = batch.ids.shape[0]
        ids = batch.ids.masked_fill(batch.visual, 0)  # image placeholders may lie outside the vocabulary
        hidden = runner.embed(ids)  # [B,T,D]
        t0 = time.perf_counter()
        has_image = batch.visual.any(1)
        zero_exit = torch.tensor([self.plans[i].exits_at(0) for i in range(B)], device=has_image.device)
        zero_exit &= batch.exitable
        data = {}
        if bool((has_image & ~zero_exit).any()):  # vision is skipped only when every image is dropped at 0
            feats = d.visual_features(batch.visions)
            if isinstance(feats, dict):
                for name, value in feats.items():
                    if name != "features":
                        data[name] = hidden.new_zeros((*batch.visual.shape, *value.shape[1:]), dtype=value.dtype)
                        data[name][batch.visual] = value.to(data[name].device)
                feats = feats["features"]
            hidden[batch.visual] = feats.to(hidden.dtype)
        runner.synchronize()
        self.vision_s = time.perf_counter() - t0
        t = {"hidden": hidden, "positions": batch.positions, "mask": batch.mask, "visual": batch.visual,
             "text_mask": batch.text_mask, "token_groups": batch.token_groups, **data}
        g = Group(torch.arange(B, device=batch.ids.device), t)
        keep = torch.ones_like(batch.visual)
        for i in range(B):
            if bool(zero_exit[i]):
                keep[i] = ~batch.visual[i]
                self.exit_layers[i], self.exited[i] = 0, True
            elif self.plans[i].prune is not None and self.plans[i].prune.divprune is not None \
                    and bool(batch.exitable[i]):
                vis = batch.visual[i]
                keep[i, vis] = divprune_keep(hidden[i, vis], self.plans[i].prune.divprune)
        changed = bool((~keep & batch.visual).any())
        self.groups = partition([compact(g, keep) if changed else g], self._exited_rows())

    def _boundary(self, a: int) -> None:
        """Exits and FastV stages at boundary ``a`` (> 0) for every group."""
        new, changed = [], False
        for g in self.groups:
            rows = g.rows.tolist()
            keep = torch.ones_like(g.t["visual"])
            leave = self._exits(a, g)
            for i, r in enumerate(rows):
                if leave[i]:
                    keep[i] = ~g.t["visual"][i]
                    self.exit_layers[r], self.exited[r] = a, True
                    continue
                plan = self.plans[r]
                share = plan.prune.fastv_at(a) if plan.prune is not None and not self.exited[r] else None
                vis = g.t["visual"][i]
                if share is not None and r in self.scores:
                    keep[i, vis] = fastv_keep(self.scores[r][vis], share)
            if bool((~keep & g.t["visual"]).any()):
                g, changed = compact(g, keep), True
            new.append(g)
        self.scores = {}
        self.groups = partition(new, self._exited_rows()) if changed else new

    def _exited_rows(self) -> set:
        return {r for r, e in enumerate(self.exited) if e}

    def _exits(self, a: int, g: Group) -> list[bool]:
        """Which rows of ``g`` drop every visual token before layer ``a`` (gates asked once, batched)."""
        d = self.d
        rows = g.rows.tolist()
        exitable = self.batch.exitable[g.rows].tolist()
        leave = [False] * len(rows)
        asked = []
        for i, r in enumerate(rows):
            if self.exited[r] or not exitable[i]:
                continue
            plan = self.plans[r]
            if plan.policy.gated:
                if a in d.gate_index:
                    asked.append(i)
            elif plan.exits_at(a):
                leave[i] = True
        if asked:
            sub = g if len(asked) == len(rows) else g.select(torch.tensor(asked, device=g.rows.device))
            probs = d.runner.gate(sub.hidden, sub.text_mask, d.gate_index[a])[:, 1].float().tolist()
            for i, p in zip(asked, probs):
                r = rows[i]
                self.gate_probs[r][a] = p
                leave[i] = p > self.plans[r].threshold
        return leave

    # -- segments ------------------------------------------------------------------------------
    def step(self) -> None:
        """Decisions at the next segment's start, then that segment for every group."""
        d, runner = self.d, self.d.runner
        j = self.j
        a, b = d.segments[j]
        if self.groups is None:
            self._start()
        elif a > 0:
            self._boundary(a)
        exitable = self.batch.exitable.tolist()
        wants_scores = {r for r, plan in enumerate(self.plans)  # FastV stages at b of rows still holding visual tokens
                        if plan.prune is not None and b in plan.prune.score_layers and not self.exited[r]
                        and exitable[r]}
        entries = []
        for g in self.groups:
            G, S = g.t["mask"].shape
            rows = g.rows.tolist()
            capacity = S + max(self.max_new[r] for r in rows)
            cache = runner.new_cache(j, G, capacity, g.mode)
            keys = _key_inputs(g) if d.wants_keys else {}
            data = {k: v for k, v in g.t.items() if k not in BASE_FIELDS}
            want = bool(wants_scores.intersection(rows))
            out = d.run_segment(j, g.t["hidden"], g.t["positions"], g.t["mask"], cache, g.mode, keys, data, want)
            hidden, scores = out if want else (out, None)
            g.t["hidden"] = hidden
            if want:
                for i, r in enumerate(rows):
                    if r in wants_scores:
                        self.scores[r] = scores[i].float()
            for r, n in zip(rows, g.lengths.tolist()):
                self.tokens[r].append(n)
            entries.append(CacheEntry(rows, g.mode, cache, g.t["mask"], keys))
        self.entries.append(entries)
        self.j += 1
        if self.j == len(d.segments):
            B = self.batch.ids.shape[0]
            last = self.groups[0].t["hidden"].new_empty(B, 1, self.groups[0].t["hidden"].shape[-1])
            for g in self.groups:
                last[g.rows] = g.t["hidden"][:, -1:]
            self.last = last
            self.groups = None

    def run(self) -> "Prefill":
        while not self.done:
            self.step()
        return self


def _key_inputs(g: Group) -> dict:
    """Key-side mask inputs of a prefill group: 1-D key positions and token groups [G,S]."""
    return {"key_positions": g.t["positions"][..., 0], "token_groups": g.t["token_groups"]}


@dataclass
class Lane:
    """One segment's cache of decoding rows of one mode: ``slots`` (row ids in lane order), the
    runner cache (every row right-aligned at ``cache.length``), key padding [G,P] and key inputs."""

    mode: str
    slots: list
    cache: object
    mask: torch.Tensor
    keys: dict = field(default_factory=dict)


class DecodeBatch:
    """The rows being decoded, with their caches in per-segment lanes; rows join after their
    prefill and leave at any step (see module docstring)."""

    def __init__(self, dispatcher: Dispatcher):
        self.d = dispatcher
        self.lanes: list[list[Lane]] = [[] for _ in dispatcher.segments]
        self.slots: list = []  # row ids in the order of step()'s rows
        self.remaining: dict = {}  # row id -> tokens it may still decode (cache capacity)

    def __len__(self) -> int:
        return len(self.slots)

    def join(self, prefill: Prefill, slots: list, remaining: list[int]) -> None:
        """Add a finished prefill's rows (prefill row i becomes row id ``slots[i]``), each able to
        decode ``remaining[i]`` more tokens."""
        runner = self.d.runner
        for s, n in zip(slots, remaining):
            self.remaining[s] = int(n)
        self.slots += list(slots)
        for j, entries in enumerate(prefill.entries):
            for e in entries:
                lane = Lane(e.mode, [slots[r] for r in e.rows], e.cache, e.mask, dict(e.keys))
                same = [x for x in self.lanes[j] if x.mode == e.mode]
                if not same:
                    self.lanes[j].append(lane)
                    continue
                old = same[0]
                merged = self._merge(old, lane)
                runner.release_cache(old.cache)
                runner.release_cache(lane.cache)
                self.lanes[j][self.lanes[j].index(old)] = merged

    def _merge(self, a: Lane, b: Lane) -> Lane:
        P = max(a.cache.length, b.cache.length)
        capacity = P + max(self.remaining[s] for s in a.slots + b.slots)
        cache = self.d.runner.cache_join([a.cache, b.cache], capacity)
        mask = torch.cat([_pad_left(a.mask, P), _pad_left(b.mask, P)])
        keys = {k: torch.cat([_pad_left(a.keys[k], P), _pad_left(b.keys[k], P)]) for k in a.keys}
        return Lane(a.mode, a.slots + b.slots, cache, mask, keys)

    def leave(self, slots) -> None:
        """Rows ``slots`` leave the batch: their cache rows are freed at once."""
        gone = set(slots)
        if not gone.intersection(self.slots):
            return
        runner = self.d.runner
        self.slots = [s for s in self.slots if s not in gone]
        for s in gone:
            self.remaining.pop(s, None)
        for lanes in self.lanes:
            for k, lane in enumerate(list(lanes)):
                stay = [i for i, s in enumerate(lane.slots) if s not in gone]
                if len(stay) == len(lane.slots):
                    continue
                if not stay:
                    runner.release_cache(lane.cache)
                    lanes.remove(lane)
                    continue
                idx = torch.tensor(stay, device=lane.mask.device)
                mask = lane.mask[idx]
                start = int((mask.sum(0) > 0).nonzero()[0]) if bool(mask.any()) else mask.shape[1]
                cache = runner.cache_take(lane.cache, idx, start)
                runner.release_cache(lane.cache)
                lanes[lanes.index(lane)] = Lane(lane.mode, [lane.slots[i] for i in stay], cache, mask[:, start:],
                                                {k: v[idx][:, start:] for k, v in lane.keys.items()})

    def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row through every segment: hidden [n,1,D], positions [n,1,R] in the order
        of :attr:`slots` -> hidden [n,1,D]."""
        d = self.d
        order = {s: i for i, s in enumerate(self.slots)}
        for s in self.slots:
            self.remaining[s] -= 1
        for j, lanes in enumerate(self.lanes):
            out = hidden if len(lanes) == 1 and lanes[0].slots == self.slots else torch.empty_like(hidden)
            for lane in lanes:
                whole = lane.slots == self.slots
                idx = None if whole else torch.tensor([order[s] for s in lane.slots], device=hidden.device)
                h = hidden if whole else hidden[idx]
                pos = positions if whole else positions[idx]
                G = len(lane.slots)
                lane.mask = torch.cat([lane.mask, lane.mask.new_ones(G, 1)], 1)
                if lane.keys:
                    new = {"key_positions": pos[..., 0], "token_groups": torch.zeros_like(pos[..., 0])}
                    lane.keys = {k: torch.cat([v, new[k].to(v.device)], 1) for k, v in lane.keys.items()}
                res = d.run_segment(j, h, pos, lane.mask, lane.cache, "decode", lane.keys)
                if whole:
                    out = res
                else:
                    out[idx] = res.to(out.dtype)
            hidden = out
        return hidden

    def cache_bytes(self) -> int:
        """Bytes the lanes' caches hold (padding included)."""
        return sum(self.d.runner.cache_nbytes(lane.cache) for lanes in self.lanes for lane in lanes)

    def close(self) -> None:
        """Release every cache."""
        for lanes in self.lanes:
            for lane in lanes:
                self.d.runner.release_cache(lane.cache)
            lanes.clear()
        self.slots, self.remaining = [], {}
