#!/usr/bin/env python
"""GPU benchmark of the torch backend on a LLaVA-1.5-7B-shaped model with random weights.

    python scripts/bench_gpu.py                     # 32 layers, d=4096, 576 visual tokens, fp16, CUDA

Builds the dyvte modules directly on the device (no checkpoint, no export), runs them through
the same dispatcher as every engine folder, and prints, measured side by side in one process:

* prefill (first token) with ``never`` and ``layer:K`` next to their FLOPs ratio;
* decode tokens/s of ``never`` and ``layer:K`` with CUDA-graph decoding on and off;
* decode tokens/s of Hugging Face ``LlavaForConditionalGeneration.generate`` (sdpa attention, the
  same shapes, its own random weights) on the same device, as the baseline;
* peak device memory of each.

Decode tokens/s = (new_tokens - 1) / decode time (the first token comes from the prefill); for
Hugging Face the same from the difference of ``generate`` with ``new_tokens`` and with 1 token.
Smaller shapes (``--layers 2 --hidden 256 --device cpu``) run anywhere, which is how CI keeps this
script working.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _hf_model(hf_config, device, dtype):
    """A random-weight HF LLaVA built straight on the device (sdpa attention)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=None, help="default hidden/128")
    ap.add_argument("--intermediate", type=int, default=None, help="default 11008 for d=4096, else 2.6875 d")
    ap.add_argument("--vocab", type=int, default=32064)
    ap.add_argument("--vision-layers", type=int, default=23, help="CLIP ViT-L/14-336 layers up to LLaVA's feature layer")
    ap.add_argument("--vision-hidden", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--exit", type=int, default=None, help="K of layer:K (default L/2)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from dyvte import flops
    from dyvte.engines.manifest import synthetic_manifest
    from dyvte.runtime.backends.torch import TorchRunner
    from dyvte.runtime.pipeline import Pipeline
    from dyvte.settings import default_candidates

    cuda = args.device.startswith("cuda")
    d, L = args.hidden, args.layers
    heads = args.heads or max(1, d // 128)
    inter = args.intermediate or (11008 if d == 4096 else int(d * 2.6875))
    k = args.exit if args.exit is not None else L // 2
    cands = sorted(set(default_candidates(L)) | ({k} if 0 < k < L else set()))
    n_vis = (args.image_size // args.patch) ** 2
    text = {"num_layers": L, "hidden_size": d, "num_heads": heads, "num_kv_heads": heads, "head_dim": d // heads,
            "intermediate_size": inter, "vocab_size": args.vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "rope_dim": d // heads, "attention_scaling": 1.0, "qkv_bias": False, "o_bias": False, "mlp_bias": False,
            "max_position_embeddings": 4096}
    T = n_vis + args.text_tokens
    limits = {"max_batch": 1, "max_input_len": T, "max_new_tokens": args.new_tokens}
    image_token = min(32000, args.vocab - 1)  # LLaVA-1.5's id where the vocabulary has room
    manifest = synthetic_manifest(text, cands, n_vis, (3, args.image_size, args.image_size), limits,
                                  image_token_id=image_token)
    hf_config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                                       num_hidden_layers=args.vision_layers + 1, num_attention_heads=args.vision_hidden // 64,
                                       image_size=args.image_size, patch_size=args.patch),
        text_config=LlamaConfig(hidden_size=d, num_hidden_layers=L, vocab_size=args.vocab, num_attention_heads=heads,
                                num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=4096),
        vision_feature_layer=-2, image_token_index=image_token, image_seq_length=n_vis)
    dtype = getattr(torch, args.dtype)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runner = TorchRunner(manifest, device=args.device, dtype=args.dtype, cuda_graphs=True, reuse_caches=True,
                         random_weights=True, hf_config=hf_config)
    pipe = Pipeline(manifest, runner)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], np.full(n_vis, image_token), rng.integers(3, image_token, args.text_tokens - 1)])[None].astype(np.int64)
    pixels = rng.standard_normal((1, 3, args.image_size, args.image_size)).astype(np.float32)
    pols = {"never": "never", f"layer:{k}": f"layer:{k}"}
    graph_modes = [True, False] if cuda else [False]
    prefill = {p: [] for p in pols}
    decode = {(p, g): [] for p in pols for g in graph_modes}
    for g in graph_modes:  # warm-up (CUDA graphs are captured here, once per shape bucket)
        runner.cuda_graphs = g
        for p in pols.values():
            pipe.generate_ids(ids, pixels, max_new_tokens=args.new_tokens, policy=p)
    for _ in range(args.reps):
        for name, p in pols.items():
            r = pipe.generate_ids(ids, pixels, max_new_tokens=1, policy=p)
            prefill[name].append(r.timings["prefill_s"])
            for g in graph_modes:
                runner.cuda_graphs = g
                r = pipe.generate_ids(ids, pixels, max_new_tokens=args.new_tokens, policy=p)
                decode[(name, g)].append(r.timings["decode_tokens_per_s"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    captures = runner.graph_captures
    pipe.close()
    del runner, pipe

    hf_tps, hf_peak, hf_prefill = [], float("nan"), []
    if not args.no_hf:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = _hf_model(hf_config, args.device, dtype)
        t_ids = torch.from_numpy(ids).to(args.device)
        t_px = torch.from_numpy(pixels).to(args.device, dtype)
        kw = dict(input_ids=t_ids, pixel_values=t_px, attention_mask=torch.ones_like(t_ids), do_sample=False)

        def timed(n):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t

        timed(args.new_tokens)  # warm-up
        for _ in range(args.reps):
            one, many = timed(1), timed(args.new_tokens)
            hf_prefill.append(one)
            hf_tps.append((args.new_tokens - 1) / max(many - one, 1e-9))
        hf_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        del model

    vis = flops.vision_flops({"hidden_size": args.vision_hidden, "intermediate_size": 4 * args.vision_hidden,
                              "patch_size": args.patch, "image_size": args.image_size}, args.vision_layers, d)
    f = {name: flops.prefill_flops(text, T, n_vis, L if p == "never" else k, vis) for name, p in pols.items()}
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{time.strftime('%Y-%m-%d')}  {dev}  torch backend, {args.dtype}, L={L}, d={d}, {T} prompt tokens "
          f"({n_vis} visual), {args.new_tokens} new tokens, median of {args.reps}")
    med = {n: statistics.median(v) for n, v in prefill.items()}
    head = f"{'variant':<22}{'prefill ms':>11}{'TFLOPs':>9}{'decode tok/s':>14}"
    print(head)
    for name in pols:
        for g in graph_modes:
            label = f"{name}" + (f" graphs {'on' if g else 'off'}" if cuda else "")
            print(f"{label:<22}{med[name] * 1e3:>11.2f}{f[name] / 1e12:>9.3f}{statistics.median(decode[(name, g)]):>14.1f}")
    if hf_tps:
        print(f"{'HF generate (sdpa)':<22}{statistics.median(hf_prefill) * 1e3:>11.2f}{f['never'] / 1e12:>9.3f}"
              f"{statistics.median(hf_tps):>14.1f}")
    name = f"layer:{k}"
    print(f"\nprefill time ratio {name}/never {med[name] / med['never']:.3f}   FLOPs ratio {f[name] / f['never']:.3f}")
    g = graph_modes[0]
    if hf_tps:
        print(f"decode tok/s never{' (graphs on)' if cuda else ''} / HF generate: "
              f"{statistics.median(decode[('never', g)]) / statistics.median(hf_tps):.2f}")
    print(f"peak device memory: dyvte {peak:.2f} GiB, HF {hf_peak:.2f} GiB; decode graphs captured: {captures}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "prefill_s": prefill, "flops": f, "peak_gib": peak, "hf_peak_gib": hf_peak,
                       "decode_tokens_per_s": {f"{n} graphs {'on' if g else 'off'}": v for (n, g), v in decode.items()},
                       "hf_decode_tokens_per_s": hf_tps, "hf_prefill_s": hf_prefill, "graph_captures": captures,
                       "args": vars(args)}, fh, indent=2)


if __name__ == "__main__":
    main()
