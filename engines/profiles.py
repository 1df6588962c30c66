"""TensorRT optimization profiles derived from an engine folder's limits.

Every part gets shape ranges (min, opt, max) per named axis; a decoder segment gets three
profiles, one per way the dispatcher calls it (see runtime/backends/base.py MODES):

    full    prefill of whole prompts:      seq in [1, max_input_len],  past = 0
    text    prefill after an exit:         seq in [1, max_input_len - V], past = 0
    decode  one token with a cache:        seq = 1, past in [1, max_input_len + max_new_tokens - 1]

(V = the fewest visual tokens one image can become, from the model family; total = past + seq.)
Profiles range inputs only; outputs follow from them: ``present.*`` and ``attention_last``
(FastV's scores, every segment but the last) on ``total``. Pruned prefills only shorten the
sequences, so they stay within ``full`` (visual tokens left) and ``text`` (after the exit).
The vision part's profiles come from the family: LLaVA-style ``images`` counts tiles, up to
max_batch x the folder's tiles per prompt; Qwen-VL encodes one image per call, so ``patches``
ranges up to the export's patches per image (``--max-pixels``) and ``windows`` up to the most
windows such an image has. The lint checks these against the graphs, the TensorRT builder and
runner use them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_batch: int
    max_input_len: int
    max_new_tokens: int

    @classmethod
    def from_manifest(cls, manifest, **overrides) -> "Limits":
        lim = dict(manifest.limits)
        lim.update({k: v for k, v in overrides.items() if v is not None})
        return cls(int(lim["max_batch"]), int(lim["max_input_len"]), int(lim["max_new_tokens"]))


def _axes(lo: dict, opt: dict, hi: dict) -> dict:
    return {k: (lo[k], opt[k], hi[k]) for k in lo}


def part_profiles(manifest, part, limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{profile name: {axis name: (min, opt, max)}} for one part."""
    from dyvte.families import family_named

    B = limits.max_batch
    family, vmeta = family_named(manifest.model["family"]), manifest.model["vision"]
    V = family.min_visual_tokens(vmeta)
    tokens = int(vmeta["tokens_per_tile"])
    n_in = limits.max_input_len
    total = n_in + limits.max_new_tokens
    text_max = max(1, n_in - V)
    b = (1, min(B, 1), B)
    if part.kind == "segment":
        return {
            # full prefill starts at 1 token: prompts without an image also run in full mode
            "full": {"batch": b, "seq": (1, min(n_in, tokens + 64), n_in), "past": (0, 0, 0),
                     "total": (1, min(n_in, tokens + 64), n_in)},
            "text": {"batch": b, "seq": (1, min(text_max, 64), text_max), "past": (0, 0, 0),
                     "total": (1, min(text_max, 64), text_max)},
            "decode": {"batch": b, "seq": (1, 1, 1), "past": (1, min(total - 1, n_in), total - 1),
                       "total": (2, min(total, n_in + 1), total)},
        }
    if part.kind == "vision":
        return family.vision_profiles(vmeta, B)
    if part.kind == "embed":
        return {"default": {"batch": b, "seq": (1, min(n_in, tokens + 64), n_in)}}
    if part.kind == "gate":
        return {"default": {"batch": b, "seq": (1, min(n_in, tokens + 64), n_in)}}
    if part.kind == "head":
        return {"default": {"batch": b, "seq": (1, 1, 1)}}
    raise ValueError(part.kind)


def input_shapes(part, axes: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Concrete (min, opt, max) shapes of every input of ``part`` for one profile."""
    out = {}
    for t in part.inputs:
        dims = [[d, d, d] if isinstance(d, int) else list(axes[d]) for d in t["shape"]]
        out[t["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return out
