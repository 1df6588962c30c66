#!/usr/bin/env python
"""Fine-tune the embedded demo LLaVA with DivPrune in the loop (the model learns to answer from a
pruned visual sequence), on CPU, reproducibly.

    python scripts/finetune_demo_prune.py --out build/demo-prune-ft          (about 15 min on 2 cores)
    dyvte train-gates --model build/demo-prune-ft --out build/demo-prune-ft-gates.safetensors \\
          --candidates 1,2,3,4,5,6,7 --hidden 256 --samples 8000 --epochs 15 --lr 1e-3 --alpha 2
    dyvte-export --model build/demo-prune-ft --gates build/demo-prune-ft-gates.safetensors \\
          --candidates 1,2,3,4,5,6,7 --out build/demo-prune-ft-engine
    dyvte calibrate-vtw --engine-dir build/demo-prune-ft-engine
    dyvte eval --engine-dir build/demo-prune-ft-engine --frontier --plots build/plots

Why: the shipped demo model was trained with every one of its 36 visual tokens (one per scene
cell) present until the exit; DivPrune then keeps every object cell yet drops empty background
cells, which this model relies on when it counts, so pruning costs it its count questions (README
"Accuracy vs decoder FLOPs"). Continuing stage 2 of scripts/train_demo_model.py for a few hundred
steps with DivPrune applied to half the batches (R drawn from 0.25, 0.5, 0.75, with the same
selection the runtime uses, dyvte.runtime.plan.divprune_keep), and the withdrawal augmentation
kept, teaches it to count from what DivPrune keeps. The result is a plain
LlavaForConditionalGeneration; inference is unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as T  # noqa: E402  (the demo's data, collation and alignment objective)


def divprune_forward(em, ids, px, mask, exit_layer, share, feats):
    """Teacher-forced logits [B,S',V], original columns and mask of a run that keeps DivPrune's
    choice (drop share ``share``; None: all) of each row's visual tokens before layer 0 and exits
    at ``exit_layer`` (None: no exit). Right padding, like dyvte.exits.ExitModel.forward."""
    from dyvte.runtime.plan import divprune_keep

    s = em.embed(ids, px, mask, feats)
    if share:
        keep = torch.ones_like(s.visual)
        for b in range(ids.shape[0]):
            vis = s.visual[b]
            keep[b, vis] = divprune_keep(s.hidden[b, vis].detach(), share)
        s = em.select(s, keep)
    L = em.num_layers
    k = L if exit_layer is None else exit_layer
    s, _ = em.layers(s, 0, k)
    if k < L:
        s, _ = em.layers(em.drop_visual(s), k, L)
    return em.head(s.hidden), s.index, s.mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint to start from (default: the demo model)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--prune-prob", type=float, default=0.5, help="share of batches pruned by DivPrune")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="DivPrune's R, drawn per batch")
    ap.add_argument("--exit-prob", type=float, default=0.5, help="share of batches that withdraw after a random layer")
    ap.add_argument("--blind-prob", type=float, default=0.05, help="share of batches without visual tokens")
    ap.add_argument("--train-samples", type=int, default=12000)
    ap.add_argument("--align-weight", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)

    from dyvte.data import num_visual_tokens
    from dyvte.demo import default_model_dir
    from dyvte.exits import ExitModel, answer_loss
    from dyvte.models import load_model, load_processor, quiet_transformers
    from dyvte.synth import TRAIN_SEED
    from dyvte.tiny import build_tiny_llava

    quiet_transformers()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    src = args.model or default_model_dir()
    model = load_model(src).train()
    model.config._attn_implementation = "sdpa"
    processor = load_processor(src)
    em = ExitModel(model)
    pad = processor.tokenizer.pad_token_id
    aligner = T.Aligner(processor.tokenizer)
    train = T.make_pool(TRAIN_SEED, args.train_samples, processor, num_visual_tokens(processor), "train data", 3)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    embed = model.model.language_model.embed_tokens.weight
    L, warm = em.num_layers, max(1, args.steps // 20)
    t0 = time.time()
    order, pos = list(range(len(train))), len(train)
    for step in range(args.steps):
        if pos + args.batch > len(order):
            rng.shuffle(order)
            pos = 0
        items = [train[i] for i in order[pos: pos + args.batch]]
        pos += args.batch
        ids, mask, labels, px, cells = T.collate(items, processor, pad)
        r = rng.random()
        k = 0 if r < args.blind_prob else rng.randint(1, L - 1) if r < args.blind_prob + args.exit_prob else None
        share = rng.choice(args.shares) if rng.random() < args.prune_prob else None
        feats = em.image_features(px)
        logits, index, m = divprune_forward(em, ids, px, mask, k, share, feats)
        loss = answer_loss(logits, index, m, labels) + args.align_weight * aligner.loss(feats, cells, embed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"{time.time() - t0:6.0f}s  step {step:4d}  loss {loss.item():.4f}  exit {k}  divprune {share}",
                  file=sys.stderr, flush=True)
    model.eval()
    model.config._attn_implementation = "eager"
    build_tiny_llava(T.spec(), args.out, model=model)
    (args.out / "training_log.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "from": str(src), "train_seconds": round(time.time() - t0),
        "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
