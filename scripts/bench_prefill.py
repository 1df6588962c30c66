#!/usr/bin/env python
"""Prefill benchmark on one CPU: DyVTE ``layer:K`` vs ``never`` vs Hugging Face eager ``generate``.

Builds (once, cached in --workdir) a random model of the family's shape -- d=1024, 16 decoder
layers, a small 336-px / patch-14 CLIP tower (576 tokens per tile), ~40 text tokens -- exports
it with dyvte's default candidates, and times, interleaved in one process:

  never     dyvte ONNX Runtime pipeline, policy never, max_new_tokens=1 (= prefill + 1st token)
  layer:K   the same pipeline, all visual tokens dropped before layer K
  hf        the transformers model (eager attention), generate(max_new_tokens=1)

``--family llava`` (default): LLaVA-1.5, one 336-px image = 576 visual tokens.
``--family llava_next``: LLaVA-NeXT with LLaVA-1.6's grid pinpoints; a 672x672 image is a base tile
plus 2x2 tiles = 2,928 visual tokens (``--image W H`` for other sizes).
``--family qwen2_5_vl`` (or ``qwen2_vl``): a Qwen2.5-VL-shaped model -- GQA decoder (16 query / 2 KV
heads at d=1024) with M-RoPE, a 4-block ViT (width 256, patch 14, 2x2 merge, 112-px windows, the last
block full attention, as every 8th block of the real one) and Qwen's default pixel range (up to 1,280
tokens per image); an 896x896 image = 1,024 visual tokens.

and prints medians, exit/never next to the FLOPs ratio (dyvte/flops.py) and never/hf.
``--sweep`` also exports the model with candidates every 1, 2 (default), 4 and 16 layers and
times ``never`` for each: the per-boundary cost of segmenting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT = ("look at the picture and tell me which shape is on the left of the red circle and which color the "
          "square at the top right has , is there one triangle or two ?")


LLAVA_16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
DEFAULT_IMAGE = {"llava_next": (672, 672), "qwen2_vl": (896, 896), "qwen2_5_vl": (896, 896)}  # (W, H)


def build(workdir: Path, args):
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    extra = {"vision_layers": 3}
    heads = args.hidden // 64
    kv_heads = heads
    if args.family == "llava_next":
        extra["grid_pinpoints"] = LLAVA_16_PINPOINTS
    if args.family in ("qwen2_vl", "qwen2_5_vl"):
        kv_heads = max(1, heads // 8)  # Qwen2.5-VL-3B/7B: 16/2 and 28/4 heads
        extra = {"vision_layers": 4, "window_size": 112, "full_blocks": (3,), "min_pixels": 56 * 56,
                 "max_pixels": 28 * 28 * 1280}
    spec = TinyLlavaSpec(hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                         num_kv_heads=kv_heads, intermediate_size=int(args.hidden * 2.75),
                         vision_hidden_size=256, vision_heads=4, vision_intermediate_size=1024,
                         image_size=336, patch_size=14, words=tuple(sorted(set(PROMPT.split()))),
                         max_position_embeddings=4096, family=args.family, **extra)
    model_dir = workdir / f"{args.family}-d{args.hidden}-L{args.layers}"
    if not (model_dir / "config.json").is_file():
        print(f"building {model_dir}", file=sys.stderr)
        build_tiny_llava(spec, model_dir, seed=0)
    return model_dir


def export_once(model_dir: Path, out: Path, candidates=None):
    from dyvte.exporter import ExportSettings, export

    if not (out / "manifest.json").is_file():
        print(f"exporting {out}", file=sys.stderr)
        export(ExportSettings(out=out, model=str(model_dir), candidates=candidates, progress=True,
                              max_input_len=3072, max_new_tokens=16))
    return out


def timed(fn, sink: list):
    t = time.perf_counter()
    fn()
    sink.append(time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("build/bench"))
    ap.add_argument("--family", choices=["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"], default="llava")
    ap.add_argument("--image", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="image size (default 336x336, 672x672 for llava_next, 896x896 for qwen)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--exit", type=int, default=8, help="K of policy layer:K")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="also time candidate spacings 1, 2, 4, L")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dyvte import flops
    from dyvte.models import load_model
    from dyvte.runtime import Pipeline
    from dyvte.runtime.inputs import encode

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build(args.workdir, args)
    engine = export_once(model_dir, args.workdir / f"engine-{args.family}")
    pipe = Pipeline.load(engine, backend="onnxruntime")
    hf = load_model(model_dir)
    from PIL import Image

    w, h = args.image or DEFAULT_IMAGE.get(args.family, (336, 336))
    image = Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8"))
    ids, vision = encode(pipe.processor, image, PROMPT)
    T = len(ids)
    ids_np, vision_np = ids[None].numpy(), {k: v.numpy() for k, v in vision.items()}
    hf_ids, mask = ids[None], torch.ones(1, T, dtype=torch.long)
    probe = pipe.generate_ids(ids_np, **vision_np, max_new_tokens=1, policy="never")
    n_vis, tiles, grids = probe.visual_tokens, probe.image_tiles, probe.image_grids

    variants = {
        "never": lambda: pipe.generate_ids(ids_np, **vision_np, max_new_tokens=1, policy="never"),
        f"layer:{args.exit}": lambda: pipe.generate_ids(ids_np, **vision_np, max_new_tokens=1,
                                                        policy=f"layer:{args.exit}"),
        "hf": lambda: hf.generate(input_ids=hf_ids, **vision, attention_mask=mask, max_new_tokens=1, do_sample=False),
    }
    sweep = {}
    if args.sweep:
        L = args.layers
        for step in (1, 2, 4, L):
            cands = list(range(step, L, step))
            e = export_once(model_dir, args.workdir / f"engine-every{step}", cands)
            sweep[f"{len(cands) + 1} segments (every {step})"] = Pipeline.load(e, backend="onnxruntime")
    times = {k: [] for k in variants}
    decode = {k: [] for k in sweep}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in variants.items():
                timed(fn, times[name])
            for name, p in sweep.items():  # prefill and decode with policy never
                r = p.generate_ids(ids_np, **vision_np, max_new_tokens=16, policy="never")
                times.setdefault(name, []).append(r.timings["prefill_s"])
                decode[name].append(r.timings["decode_tokens_per_s"])

    t = pipe.manifest.text
    vis = flops.manifest_vision_flops(pipe.manifest, tiles, grids)
    f_never = flops.prefill_flops(t, T, n_vis, t["num_layers"], vis)
    f_exit = flops.prefill_flops(t, T, n_vis, args.exit, vis)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    threads = torch.get_num_threads()
    print(f"\n{args.family} prefill on CPU ({threads} threads), d={t['hidden_size']}, L={t['num_layers']}, "
          f"{T} prompt tokens ({n_vis} visual in {tiles} tile(s), {T - n_vis} text), fp32, median of {args.reps}")
    print(f"{'variant':<24}{'median s':>10}{'min s':>10}{'GFLOPs':>10}")
    gfl = {"never": f_never, f"layer:{args.exit}": f_exit, "hf": f_never}
    for k in variants:
        g = gfl[k]
        print(f"{k:<24}{med[k]:>10.3f}{min(times[k]):>10.3f}{g / 1e9:>10.1f}")
    r_exit = med[f"layer:{args.exit}"] / med["never"]
    r_flops = f_exit / f_never
    low = {k: min(v) for k, v in times.items() if v}  # minima: least disturbed by other jobs on the machine
    print(f"\nexit/never time ratio   {r_exit:.3f}   (minima {low[f'layer:{args.exit}'] / low['never']:.3f})")
    print(f"exit/never FLOPs ratio  {r_flops:.3f}   (time ratio / FLOPs ratio = {r_exit / r_flops:.3f})")
    print(f"never/hf time ratio     {med['never'] / med['hf']:.3f}   (minima {low['never'] / low['hf']:.3f})")
    if sweep:
        print("\ncost of segment boundaries (policy never, 16 new tokens):")
        print(f"  {'segments':<26}{'prefill s':>10}{'decode tok/s':>14}")
        for k in sweep:
            print(f"  {k:<26}{med[k]:>10.3f}{statistics.median(decode[k]):>14.1f}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "median": med, "flops": {"never": f_never, "exit": f_exit},
                                         "decode_tokens_per_s": decode, "prompt_tokens": T, "visual_tokens": n_vis,
                                         "tiles": tiles, "grids": grids, "vision_flops": vis, "family": args.family,
                                         "threads": threads}, indent=2))


if __name__ == "__main__":
    main()
