#!/usr/bin/env python
"""Prefill cost of visual-token pruning on one CPU: does pruning pay what its FLOPs say?

Builds (once, cached in --workdir) the random LLaVA of scripts/bench_prefill.py -- d=1024, 16
decoder layers (16 heads, MLP 2816), a 3-layer CLIP tower at 336 px / patch 14 (576 visual
tokens), a 40-token question -- exports it with the default candidates (every 2 layers, so
K = 2 and L/2 are segment boundaries; ``--prune-layers`` adds others) and times, interleaved in
one process, the dyvte ONNX Runtime pipeline with max_new_tokens = 1 (prefill + first token) for

  never                       all tokens, every layer
  fastv:2:0.75                FastV at layer 2 keeps 144 of the 576 visual tokens
  divprune:0.75               DivPrune before layer 0 keeps 144
  fastv:2:0.75 + layer:L/2    FastV at 2, then every visual token leaves at L/2

and prints, per variant, the median time, its ratio over never next to the FLOPs ratio
(dyvte/flops.py on the tokens each layer saw, vision tower and lm_head included) and their
quotient (the target: within 5 %), plus the time spent choosing the tokens (DivPrune's distances
and greedy picks, FastV's ranking on the host; FastV's scores come out of the segment graph). The
choosing is in the measured time and not in the FLOPs.

    python scripts/bench_prune.py --reps 11                      # the README's numbers
    python scripts/bench_prune.py --hidden 64 --layers 8 --reps 1 --workdir /tmp/bp    # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import PROMPT, build, export_once  # noqa: E402  (the same model and export)


@contextlib.contextmanager
def timed_selection(sink: list):
    """Within the block, the token-selection functions the dispatcher calls add their time to
    ``sink[0]`` (restored afterwards)."""
    from dyvte.runtime import dispatch

    saved = dispatch.divprune_keep, dispatch.fastv_keep

    def wrap(fn):
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            sink[0] += time.perf_counter() - t
            return out

        return timed

    dispatch.divprune_keep, dispatch.fastv_keep = (wrap(f) for f in saved)
    try:
        yield
    finally:
        dispatch.divprune_keep, dispatch.fastv_keep = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("build/bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.75, help="R of both methods")
    ap.add_argument("--fastv-layer", type=int, default=2, help="K of fastv:K:R")
    ap.add_argument("--exit", type=int, default=None, help="exit layer of the composed variant (default L/2)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: one per core)")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = ap.parse_args(argv)
    args.family = "llava"

    import numpy as np
    import torch

    from dyvte import flops
    from dyvte.runtime import Pipeline
    from dyvte.runtime.inputs import encode

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build(args.workdir, args)
    engine = export_once(model_dir, args.workdir / f"engine-llava-d{args.hidden}-L{args.layers}")
    pipe = Pipeline.load(engine, backend="onnxruntime", threads=args.threads)
    L, K, R = pipe.num_layers, args.fastv_layer, args.share
    exit_layer = args.exit or L // 2
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(336, 336, 3) * 255).astype("uint8"))
    ids, vision = encode(pipe.processor, image, PROMPT)
    ids_np, vision_np = ids[None].numpy(), {k: v.numpy() for k, v in vision.items()}
    variants = {"never": ("never", None), f"fastv:{K}:{R:g}": ("never", f"fastv:{K}:{R:g}"),
                f"divprune:{R:g}": ("never", f"divprune:{R:g}"),
                f"fastv:{K}:{R:g} + layer:{exit_layer}": (f"layer:{exit_layer}", f"fastv:{K}:{R:g}")}
    for policy, spec in variants.values():
        pipe.plan(policy, 0.5, spec)  # fail early (e.g. K not a boundary: re-export with --prune-layers)
    selection = [0.0]

    def run(policy, spec):
        return pipe.generate_ids(ids_np, **vision_np, max_new_tokens=1, policy=policy, prune=spec)

    probe = {name: run(*v) for name, v in variants.items()}  # warm-up, and each variant's token plan
    times = {k: [] for k in variants}
    select = {k: [] for k in variants}
    with torch.inference_mode(), timed_selection(selection):
        for _ in range(args.reps):
            for name, v in variants.items():
                selection[0] = 0.0
                t = time.perf_counter()
                run(*v)
                times[name].append(time.perf_counter() - t)
                select[name].append(selection[0])

    t = pipe.manifest.text
    segments = [seg.layers for seg in pipe.manifest.segments]
    first = probe["never"]
    vis = flops.manifest_vision_flops(pipe.manifest, first.image_tiles, first.image_grids)
    gfl = {k: flops.plan_prefill_flops(t, flops.layer_tokens(segments, r.segment_tokens), vis) for k, r in probe.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    T, n_vis = len(ids), first.visual_tokens
    print(f"\nprune prefill on CPU (ONNX Runtime, {torch.get_num_threads()} threads), d={t['hidden_size']}, L={L}, "
          f"{T} prompt tokens ({n_vis} visual, {T - n_vis} text), fp32, max_new_tokens=1, median of {args.reps}")
    print(f"{'variant':<28}{'median s':>10}{'min s':>9}{'GFLOPs':>9}{'time/never':>12}{'FLOPs/never':>13}"
          f"{'quotient':>10}{'choose ms':>11}  tokens per segment")
    worst = 0.0
    for k in variants:
        rt, rf = med[k] / med["never"], gfl[k] / gfl["never"]
        if k != "never":
            worst = max(worst, abs(rt / rf - 1))
        print(f"{k:<28}{med[k]:>10.3f}{low[k]:>9.3f}{gfl[k] / 1e9:>9.1f}{rt:>12.3f}{rf:>13.3f}{rt / rf:>10.3f}"
              f"{1e3 * statistics.median(select[k]):>11.1f}  {probe[k].segment_tokens}")
    print(f"\nlargest |time ratio / FLOPs ratio - 1| = {100 * worst:.1f} % (target <= 5 %); minima ratios: "
          + ", ".join(f"{k} {low[k] / low['never']:.3f}" for k in variants if k != "never"))
    if args.json:
        args.json.write_text(json.dumps({"times": times, "selection_s": select, "gflops": {k: v / 1e9 for k, v in gfl.items()},
                                         "segment_tokens": {k: r.segment_tokens for k, r in probe.items()},
                                         "prompt_tokens": T, "visual_tokens": n_vis, "hidden": t["hidden_size"],
                                         "layers": L, "threads": torch.get_num_threads()}, indent=2))
    pipe.close()
    return worst


if __name__ == "__main__":
    main()
