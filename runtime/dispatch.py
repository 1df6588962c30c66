"""The DyVTE dispatcher: prefill through the segments with per-sample exits, then decode.

Sequences are left-padded so every last prompt token sits at the last position. In each
segment a batch is split into at most two groups: sequences still carrying their visual tokens
("full") and sequences that exited ("text", visual positions removed, original position ids
kept). Each group runs as its own batch with its own KV cache, so an exited sample costs what it
would cost alone. Decisions are taken once, at prefill; decoding reuses the same groups.

Position ids are carried as [G,S,R] (R = 1 for 1-D RoPE, 3 for M-RoPE rows t, h, w) from the
family's :meth:`~dyvte.families.Family.positions`, and handed to a segment in the graph's layout
([B,S] or [3,B,S]); generated tokens continue at each row's next position (prompt length for 1-D
RoPE, largest M-RoPE position + 1), exit or not.

Only rows with visual tokens and at least one text token after them can exit: a prompt without
an image has nothing to drop, and one that ends with its image has no text for the gate to
read. Such rows run every layer in the full group (exit layer L, no gate probabilities) under
every policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .policies import Policy


@dataclass
class Group:
    """Sequences sharing one layout in a segment. Shapes: [G] rows, [G,S(,D)] the rest."""

    rows: torch.Tensor  # batch indices, int64
    hidden: torch.Tensor  # [G,S,D]
    position_ids: torch.Tensor  # [G,S,R] int64 (R rows per token)
    mask: torch.Tensor  # [G,S] int64, 0 = left padding
    visual: torch.Tensor  # [G,S] bool, visual positions (all False once exited)
    text_mask: torch.Tensor  # [G,S] int64, gate features: text tokens before the last one

    def select(self, keep: torch.Tensor) -> "Group":
        return Group(self.rows[keep], self.hidden[keep], self.position_ids[keep], self.mask[keep],
                     self.visual[keep], self.text_mask[keep])


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad == 0:
        return t
    shape = (t.shape[0], pad, *t.shape[2:])
    return torch.cat([t.new_zeros(shape), t], dim=1)


def merge(a: Group | None, b: Group) -> Group:
    """Concatenate two groups along the batch, re-padding to the longer sequence."""
    if a is None:
        return b
    S = max(a.hidden.shape[1], b.hidden.shape[1])
    cat = lambda x, y: torch.cat([_pad_left(x, S), _pad_left(y, S)], dim=0)  # noqa: E731
    return Group(torch.cat([a.rows, b.rows]), cat(a.hidden, b.hidden), cat(a.position_ids, b.position_ids),
                 cat(a.mask, b.mask), cat(a.visual, b.visual), cat(a.text_mask, b.text_mask))


def drop_visual(g: Group) -> Group:
    """Remove every visual position (the exit), keep position ids, re-pad on the left."""
    keep = g.mask.bool() & ~g.visual  # [G,S]
    n = keep.sum(1)  # [G]
    S = int(n.max())
    slot = keep.long().cumsum(1) - 1 + (S - n)[:, None]  # target column of each kept token
    row = torch.arange(len(n), device=keep.device)[:, None].expand_as(keep)
    r, c = row[keep], slot[keep]

    def move(x, fill=0):
        out = x.new_full((len(n), S, *x.shape[2:]), fill)
        out[r, c] = x[keep]
        return out

    mask = torch.zeros(len(n), S, dtype=g.mask.dtype, device=keep.device)
    mask[r, c] = 1
    return Group(g.rows, move(g.hidden), move(g.position_ids), mask, torch.zeros_like(mask, dtype=torch.bool),
                 move(g.text_mask))


@dataclass
class SegmentGroup:
    """A group's KV cache in one segment and its key-padding mask (prefill mask, then ones)."""

    rows: torch.Tensor
    cache: object
    mask: torch.Tensor  # [G, prefill_len + max_new] int64
    whole: bool  # rows == arange(B): no gather/scatter needed


@dataclass
class Batch:
    """Left-padded prompts. ids/mask/visual/text_mask: [B,T]; positions [B,T,R]; lengths,
    next_positions, exitable [B]."""

    ids: torch.Tensor
    mask: torch.Tensor
    visual: torch.Tensor
    text_mask: torch.Tensor
    lengths: torch.Tensor  # real prompt lengths
    visions: list  # per row: dyvte.families.Vision (tiles to encode, packing) or None
    exitable: torch.Tensor  # bool: visual tokens with text after them (see module docstring)
    positions: torch.Tensor = None  # [B,T,R] int64 position ids (0 at left padding)
    next_positions: torch.Tensor = None  # [B] position of each row's first generated token


@dataclass
class Generation:
    tokens: list  # per sample: list[int]
    logits: list  # per sample: [n, V] float32 tensor (when requested)
    exit_layers: list
    gate_probs: list  # per sample: {layer: p_exit}
    finish: list  # "eos" | "length" | "stop"
    timings: dict = field(default_factory=dict)


def make_batch(prompts: list[torch.Tensor], visions: list, image_token_id: int, device, family=None,
               meta: dict | None = None) -> Batch:
    """Left-pad 1-D id tensors; mark visual positions and the gate's text tokens; each row's
    position ids from ``family`` (default: 1-D RoPE, 0..len-1)."""
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
    cols = torch.arange(T)
    last_visual = torch.where(visual, cols, -1).max(1).values  # [B], -1 without image
    text_mask = ((cols[None] > last_visual[:, None]) & (cols[None] < T - 1) & mask.bool()).long()
    exitable = (last_visual >= 0) & (last_visual < T - 1)  # [B]: an image, and text after it
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    return Batch(ids.to(device), mask.to(device), visual.to(device), text_mask.to(device), lengths.to(device),
                 list(visions), exitable.to(device), positions.to(device), next_positions.to(device))


class Dispatcher:
    """Runs one engine folder's parts through a :class:`Runner` with DyVTE exits."""

    def __init__(self, runner, manifest):
        from dyvte.families import family_named

        self.runner, self.manifest = runner, manifest
        self.segments = [p.layers for p in manifest.segments]
        self.gate_index = {k: i for i, k in enumerate(manifest.gate_layers)}
        self.family = family_named(manifest.model["family"])
        self._extras = None

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
        """Features [n,D] of every row's visual tokens, in prompt order: the family's vision calls
        for the batch's images (LLaVA-style: one call with every tile; Qwen-VL: one per image),
        then each row's packing."""
        visions = [v for v in visions if v is not None]
        meta, extras = self.manifest.model["vision"], self.extras()
        outputs = [self.runner.vision(feeds) for feeds in self.family.vision_calls(meta, visions)]
        return torch.cat(self.family.unpack(meta, outputs, visions, extras))

    def graph_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids [G,S,R] -> the segment graph's layout: [G,S] (1-D RoPE) or [R,G,S]."""
        return positions[..., 0] if positions.shape[-1] == 1 else positions.permute(2, 0, 1)

    # -- prefill -----------------------------------------------------------------------------
    def _exits(self, boundary: int, g: Group, exitable: torch.Tensor, policy: Policy, threshold: float,
               probs_out: list):
        """Which rows of ``g`` drop their visual tokens before layer ``boundary`` (bool [G]).
        ``exitable`` [G]: rows that can exit at all; the gate reads only those."""
        if not bool(exitable.any()):
            return None
        if policy.gated:
            if boundary not in self.gate_index:
                return None
            sub = g if bool(exitable.all()) else g.select(exitable)
            probs = self.runner.gate(sub.hidden, sub.text_mask, self.gate_index[boundary])[:, 1].float()
            for row, p in zip(sub.rows.tolist(), probs.tolist()):
                probs_out[row][boundary] = p
            leave = torch.zeros_like(exitable)
            leave[exitable] = probs.to(leave.device) > threshold
            return leave
        if policy.fixed_exit(boundary):
            return exitable
        return None

    def prefill(self, batch: Batch, policy: Policy, threshold: float, max_new: int):
        runner, B = self.runner, batch.ids.shape[0]
        runner.begin_request()  # caches of earlier requests may be reused from here on
        L = self.manifest.num_layers
        dev = batch.ids.device
        exit_layers = [L] * B
        probs = [{} for _ in range(B)]
        ids = batch.ids.masked_fill(batch.visual, 0)  # image placeholders may lie outside the vocabulary
        hidden = runner.embed(ids)  # [B,T,D]
        t0 = time.perf_counter()
        skip_vision = policy.layer == 0 and bool(batch.exitable[batch.visual.any(1)].all())  # all dropped at 0
        if batch.visual.any() and not skip_vision:
            hidden[batch.visual] = self.visual_features(batch.visions).to(hidden.dtype)
        runner.synchronize()
        vision_s = time.perf_counter() - t0
        full = Group(torch.arange(B, device=dev), hidden, batch.positions, batch.mask, batch.visual, batch.text_mask)
        text = None
        state = []
        for j, (a, b) in enumerate(self.segments):
            if full is not None:
                leave = self._exits(a, full, batch.exitable[full.rows], policy, threshold, probs)
                if leave is not None and bool(leave.any()):
                    for r in full.rows[leave].tolist():
                        exit_layers[r] = a
                    text = merge(text, drop_visual(full.select(leave)))
                    full = None if bool(leave.all()) else full.select(~leave)
            groups = []
            for g, mode in ((full, "full"), (text, "text")):
                if g is None:
                    continue
                G, S = g.mask.shape
                cache = runner.new_cache(j, G, S + max_new, mode)
                g.hidden = runner.segment(j, g.hidden, self.graph_positions(g.position_ids), g.mask, cache, mode)
                mask = torch.ones(G, S + max_new, dtype=torch.int64, device=dev)
                mask[:, :S] = g.mask
                whole = G == B and bool((g.rows == torch.arange(B, device=dev)).all())
                groups.append(SegmentGroup(g.rows, cache, mask, whole))
            state.append(groups)
        last = hidden.new_empty(B, 1, hidden.shape[-1])
        for g in (full, text):
            if g is not None:
                last[g.rows] = g.hidden[:, -1:]
        return last, state, exit_layers, probs, vision_s

    # -- decode ------------------------------------------------------------------------------
    def decode_step(self, hidden, positions, state):
        """One token per sequence through every segment. hidden [B,1,D], positions [B,1,R]."""
        runner = self.runner
        for j, groups in enumerate(state):
            if len(groups) == 1 and groups[0].whole:
                g = groups[0]
                hidden = runner.segment(j, hidden, self.graph_positions(positions), g.mask[:, : g.cache.length + 1],
                                        g.cache, "decode")
                continue
            out = torch.empty_like(hidden)
            for g in groups:
                mask = g.mask[:, : g.cache.length + 1]
                pos = self.graph_positions(positions[g.rows])
                out[g.rows] = runner.segment(j, hidden[g.rows], pos, mask, g.cache, "decode").to(out.dtype)
            hidden = out
        return hidden

    @torch.inference_mode()
    def generate(self, batch: Batch, policy: Policy, threshold: float, max_new: list[int], sampler,
                 eos_ids: list[int], return_logits: bool, on_step=None) -> Generation:
        """Prefill, then decode until every row has its ``max_new[row]`` tokens, an EOS, or a stop.

        ``on_step(step, tokens, active)``, if given, is called after every step with the new
        token of each row (list[int]) and which rows were still generating (list[bool]); it
        returns the rows to stop after this token (finish reason "stop"), or None.
        """
        runner = self.runner
        B = batch.ids.shape[0]
        eos_set = set(eos_ids)
        ends: list = [None] * B  # (tokens generated, finish reason) of finished rows

        def record(step: int, token) -> bool:
            """Mark rows finished by this step's token; True when all are."""
            toks = token.tolist()
            active = [e is None for e in ends]
            stop = set(on_step(step, toks, active) or ()) if on_step is not None else set()
            for i in range(B):
                if ends[i] is None:
                    n = step + 1
                    if toks[i] in eos_set:
                        ends[i] = (n, "eos")
                    elif i in stop:
                        ends[i] = (n, "stop")
                    elif n >= max_new[i]:
                        ends[i] = (n, "length")
            return all(e is not None for e in ends)

        runner.synchronize()
        t0 = time.perf_counter()
        last, state, exit_layers, probs, vision_s = self.prefill(batch, policy, threshold, max(max_new))
        logits = runner.head(last)[:, -1].float()  # [B,V]
        token = sampler(logits)
        tokens, kept_logits = [token], [logits] if return_logits else []
        finished = record(0, token)
        runner.synchronize()
        t1 = time.perf_counter()
        step = 1
        rows = batch.positions.shape[-1]
        while not finished:
            # each row's next position (prompt length, or M-RoPE max + 1) + step, exit or not
            positions = (batch.next_positions + step - 1)[:, None, None].expand(B, 1, rows)  # [B,1,R]
            hidden = self.decode_step(runner.embed(token[:, None]), positions, state)
            logits = runner.head(hidden)[:, -1].float()
            token = sampler(logits)
            tokens.append(token)
            if return_logits:
                kept_logits.append(logits)
            finished = record(step, token)
            step += 1
        runner.synchronize()
        t2 = time.perf_counter()
        steps = torch.stack(tokens, 1).cpu()  # [B,n]
        all_logits = torch.stack(kept_logits, 1).cpu() if return_logits else None
        out_tokens = [steps[i, :n].tolist() for i, (n, _) in enumerate(ends)]
        out_logits = [all_logits[i, :n] if return_logits else None for i, (n, _) in enumerate(ends)]
        decoded = sum(len(t) - 1 for t in out_tokens)
        timings = {
            "vision_s": vision_s,
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "total_s": t2 - t0,
            "prompt_tokens": int(batch.lengths.sum()),
            "new_tokens": sum(len(t) for t in out_tokens),
            "prefill_tokens_per_s": float(batch.lengths.sum()) / max(t1 - t0, 1e-9),
            "decode_tokens_per_s": decoded / (t2 - t1) if decoded and t2 > t1 else 0.0,
        }
        return Generation(out_tokens, out_logits, exit_layers, probs, [r for _, r in ends], timings)
