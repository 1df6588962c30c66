"""Which visual tokens each layer sees: one request's exit policy and pruning stages.

The contract (ARCHITECTURE "Tokens present at layer i"): the tokens present at layer i are every
non-visual token, plus the visual tokens kept by each pruning stage at a layer <= i, and none from
the exit layer on. Kept tokens keep their order and position ids. Decisions are taken once, at
prefill, per sample, at the segment boundaries:

    boundary 0        DivPrune on the decoder's input embeddings at the visual positions; layer:0 exits
    boundary b > 0    exit (layer:b, or the gate at candidate b says so): every visual token goes;
                      else a FastV stage at K = b drops the lowest-scored of the visual tokens present

Prune specs (contract): ``divprune:R``, ``fastv:K:R`` or both, comma-joined; R in (0, 1) is the
share of the visual tokens present at that point that is dropped (``round(n * (1 - R))`` of n
are kept). A stage at K >= the exit layer does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dyvte.errors import InputError

from .policies import Policy

PRUNE_HELP = "divprune:R, fastv:K:R or both comma-joined (e.g. divprune:0.5,fastv:2:0.75), R in (0, 1)"


@dataclass(frozen=True)
class PruneSpec:
    """Parsed prune spec: DivPrune's drop share (None: no DivPrune) and FastV stages (K, R)."""

    divprune: float | None = None
    fastv: tuple[tuple[int, float], ...] = ()

    def __str__(self) -> str:
        parts = [f"divprune:{self.divprune:g}"] if self.divprune is not None else []
        return ",".join(parts + [f"fastv:{k}:{r:g}" for k, r in self.fastv])

    def fastv_at(self, boundary: int) -> float | None:
        """Drop share of the FastV stage at ``boundary`` (None: none there)."""
        return next((r for k, r in self.fastv if k == boundary), None)

    @property
    def score_layers(self) -> set[int]:
        """Boundaries whose preceding segment must return its FastV scores."""
        return {k for k, _ in self.fastv}


def _share(text: str, spec: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise InputError(f"prune spec '{spec}': R must be a number in (0, 1) ({PRUNE_HELP})") from None
    if not 0.0 < r < 1.0:
        raise InputError(f"prune spec '{spec}': R = {text} is outside (0, 1); give the share of the visual tokens "
                         "to drop, e.g. 0.5")
    return r


def parse_prune(text: str | None, num_layers: int, boundaries) -> PruneSpec | None:
    """Parse a prune spec against an engine folder (``boundaries``: its segment boundaries, the
    layers a FastV stage can act at); None or "" or "none" = no pruning. One-line errors name the fix."""
    if text is None or isinstance(text, PruneSpec):
        return text
    if not isinstance(text, str):
        raise InputError(f"prune spec must be a string ({PRUNE_HELP}), got {type(text).__name__}")
    text = text.strip()
    if text in ("", "none"):
        return None
    divprune, fastv = None, {}
    for item in (s.strip() for s in text.split(",")):
        fields = item.split(":")
        if fields[0] == "divprune" and len(fields) == 2:
            if divprune is not None:
                raise InputError(f"prune spec '{text}' names divprune twice; give it once")
            divprune = _share(fields[1], item)
        elif fields[0] == "fastv" and len(fields) == 3:
            try:
                k = int(fields[1])
            except ValueError:
                raise InputError(f"prune spec '{item}': K must be an integer layer ({PRUNE_HELP})") from None
            if not 1 <= k < num_layers:
                raise InputError(f"prune spec '{item}': K = {k} must be in [1, {num_layers - 1}] (a layer inside the "
                                 f"{num_layers}-layer decoder)")
            if k not in boundaries:
                raise InputError(f"prune spec '{item}': this engine folder's segments start only at layers "
                                 f"{', '.join(map(str, sorted(boundaries)))}; use one of them or re-export with "
                                 f"--prune-layers {k}")
            if k in fastv:
                raise InputError(f"prune spec '{text}' has two fastv stages at layer {k}; give one")
            fastv[k] = _share(fields[2], item)
        elif fields[0] in ("divprune", "fastv"):
            raise InputError(f"prune spec '{item}' is malformed; use {PRUNE_HELP}")
        else:
            raise InputError(f"unknown pruning method '{fields[0]}' in '{text}'; use {PRUNE_HELP}")
    return PruneSpec(divprune, tuple(sorted(fastv.items())))


@dataclass(frozen=True)
class RowPlan:
    """One request's token plan: exit policy, gate threshold, pruning stages."""

    policy: Policy
    threshold: float = 0.5
    prune: PruneSpec | None = None

    def exits_at(self, boundary: int) -> bool:
        """Fixed exit at ``boundary`` (gated plans decide with the gate)."""
        return self.policy.fixed_exit(boundary)


def kept_count(n: int, share: float) -> int:
    """How many of ``n`` present visual tokens a stage dropping ``share`` keeps: round(n (1 - R))."""
    return int(round(n * (1.0 - share)))


def fastv_keep(scores, share: float):
    """FastV's choice among one row's present visual tokens (in order): scores [n] (attention of the
    last prompt token, mean over heads) -> bool [n], the kept ones. Highest first; ties: the earlier."""
    import torch

    n = scores.shape[0]
    k = kept_count(n, share)
    order = torch.sort(-scores.double(), stable=True).indices  # stable: among equal scores the earlier wins
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[order[:k]] = True
    return keep


def divprune_keep(features, share: float):
    """DivPrune's choice among one prompt's visual rows (all its images form one pool):
    features [n,D] -> bool [n] (on the features' device). Distance 1 - cos; the first pick is the
    row whose nearest other row is farthest, then repeatedly the row whose nearest already-picked
    row is farthest (ties: the earlier row; ``argmax`` returns the first maximum).

    The [n,n] distances are one float32 GEMM on the features' device (576 rows of d = 4096:
    2.7 GFLOPs, four times as much in float64); the k - 1 greedy steps run on the host in numpy
    (about 2 us a step, against 15-20 us for the same few torch ops on the CPU or for kernel
    launches on a GPU)."""
    import numpy as np
    import torch

    n = features.shape[0]
    k = kept_count(n, share)
    keep = np.zeros(n, dtype=bool)
    if k == n:  # (n = 1 included: no other row to be far from)
        keep[:] = True
    elif k > 0:
        x = features.float()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        dist = (1.0 - x @ x.T).cpu().numpy()  # [n,n]
        nearest = dist.copy()
        np.fill_diagonal(nearest, np.inf)
        first = int(nearest.min(1).argmax())  # the row whose nearest other row is farthest
        keep[first] = True
        to_picked = dist[first].copy()  # [n] distance of every row to its nearest picked row
        to_picked[first] = -np.inf
        for _ in range(k - 1):
            nxt = int(to_picked.argmax())
            keep[nxt] = True
            np.minimum(to_picked, dist[nxt], out=to_picked)
            to_picked[nxt] = -np.inf
    return torch.from_numpy(keep).to(features.device)
