#!/usr/bin/env python
"""Train the embedded demo LLaVA on synthetic visual QA, on CPU, reproducibly.

    python scripts/train_demo_model.py --out dyvte/assets/demo-llava       (about 20 min on 2 cores)

Model: CLIP-style vision tower (96 px images, patch 16 -> 36 visual tokens, one per cell of the
scene grid; 3 layers, features from the penultimate one as in LLaVA-1.5), 2-layer GELU
projector, Llama decoder (8 layers, d=128, 4 query / 2 key-value heads), word-level tokenizer,
LlavaProcessor with LLaVA-1.5's chat template. Trained from scratch in two stages, like LLaVA:

1. alignment: the vision tower and projector learn to map each cell to the decoder's word
   embeddings of what it shows (colour, shape, word), scored by dot product with the embedding
   table (LLaVA aligns its projector with captions; our scenes have exact per-cell labels);
2. instruction tuning: everything trains on the answers' cross-entropy, the alignment loss kept
   at a small weight.

Visual-token withdrawal during stage 2: with probability --exit-prob a batch drops its visual
tokens before a layer drawn uniformly from [--exit-min, L-1]. Large LLaVAs move visual
information into the text tokens in early layers on their own (the observation DyVTE and VTW
build on); a model this small, trained this briefly, needs the nudge. Inference is unchanged:
the saved model is a plain LlavaForConditionalGeneration.
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


INIT_STD = 0.06  # larger than HF's 0.02: sharper initial attention, faster start


def spec():
    from dyvte.synth import CELL, IMAGE_SIZE, vocabulary
    from dyvte.tiny import TinyLlavaSpec

    return TinyLlavaSpec(hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=352,
                         vision_hidden_size=96, vision_layers=3, vision_heads=4, vision_intermediate_size=192,
                         image_size=IMAGE_SIZE, patch_size=CELL, words=tuple(vocabulary()), max_position_embeddings=256,
                         initializer_range=INIT_STD)


def encode_dialogue(processor, n_vis: int, turns) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a conversation about one image and the [start, end) span of every answer.

    The chat template renders each prefix; an answer spans from the end of the prompt that asks
    it (generation prompt included) to the end of the conversation that contains it.
    """
    tok = processor.tokenizer
    img = processor.image_token

    def ids(msgs, gen):
        text = processor.apply_chat_template(msgs, add_generation_prompt=gen)
        return tok(text.replace(img, img * n_vis))["input_ids"]

    msgs, spans, full = [], [], []
    for i, s in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": s.question}] if i == 0 else [{"type": "text", "text": s.question}]
        msgs.append({"role": "user", "content": content})
        start = len(ids(msgs, True))
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
        full = ids(msgs, False)
        spans.append((start, len(full)))
    return full, spans


def make_pool(seed: int, n: int, processor, n_vis: int, desc: str, turns: int = 1):
    """Pre-tokenised samples: (ids, answer spans, uint8 image, first question's type, per-cell labels)."""
    import numpy as np
    from tqdm.auto import tqdm

    from dyvte.synth import make_dialogue

    pool = []
    for i in tqdm(range(n), desc=desc, unit="sample", file=sys.stderr, mininterval=10):
        dialogue = make_dialogue(seed, i, turns)
        ids, spans = encode_dialogue(processor, n_vis, dialogue)
        s = dialogue[0]
        pool.append((ids, spans, np.asarray(s.image, dtype=np.uint8), s.qtype, s.cell_labels()))
    return pool


def collate(items, processor, pad_id: int):
    """ids, mask, labels [B,T]; pixels [B,3,H,W] (the processor's normalisation); cells [B,N,3]."""
    import numpy as np

    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    T = max(len(it[0]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (seq, spans, *_) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for a, b in spans:
            labels[i, a:b] = torch.tensor(seq[a:b])
    img = torch.from_numpy(np.stack([it[2] for it in items])).permute(0, 3, 1, 2).float() / 255.0
    cells = torch.tensor([it[4] for it in items])
    return ids, mask, labels, (img - mean) / std, cells


class Aligner:
    """Stage-1 objective: visual token of cell c scores its colour/shape/word among the word
    embeddings of that attribute (plus "none" = the pad embedding)."""

    def __init__(self, tokenizer):
        from dyvte.synth import COLORS, SHAPES, WORDS

        pad = tokenizer.pad_token_id
        self.groups = [torch.tensor([pad, *tokenizer.convert_tokens_to_ids(list(g))]) for g in (COLORS, SHAPES, WORDS)]

    def loss(self, feats, cells, embed_weight):
        # feats [B,N,D] projected visual tokens, cells [B,N,3] class index per group (0 = none)
        total = 0.0
        for j, ids in enumerate(self.groups):
            logits = feats @ embed_weight[ids].t()  # [B,N,|group|]
            total = total + torch.nn.functional.cross_entropy(logits.reshape(-1, len(ids)), cells[..., j].reshape(-1))
        return total / len(self.groups)


@torch.no_grad()
def evaluate(em, pool, processor, pad_id, exit_layer=None, bs=128):
    """Teacher-forced exact match of the whole answer (every answer token argmax-correct)."""
    from dyvte.exits import answer_loss

    correct, per_type = 0, {}
    for i in range(0, len(pool), bs):
        items = pool[i: i + bs]
        ids, mask, labels, px, _ = collate(items, processor, pad_id)
        logits, index, m = em.forward(ids, px, mask, exit_layer)
        _, valid, target = answer_loss(logits, index, m, labels, reduction="none")
        ok = ((logits.argmax(-1) == target) | ~valid).all(1)
        for it, o in zip(items, ok.tolist()):
            c = per_type.setdefault(it[3], [0, 0])
            c[0] += o
            c[1] += 1
        correct += int(ok.sum())
    return correct / len(pool), {t: round(a / n, 3) for t, (a, n) in sorted(per_type.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-samples", type=int, default=30000)
    ap.add_argument("--turns", type=int, default=3, help="questions per training image (multi-turn conversations)")
    ap.add_argument("--eval-samples", type=int, default=600)
    ap.add_argument("--align-steps", type=int, default=300, help="stage 1 steps (batch 128)")
    ap.add_argument("--steps", type=int, default=2700, help="stage 2 steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--align-weight", type=float, default=0.2, help="alignment loss weight in stage 2")
    ap.add_argument("--exit-prob", type=float, default=0.5)
    ap.add_argument("--exit-min", type=int, default=1)
    ap.add_argument("--blind-prob", type=float, default=0.05,
                    help="batches with no visual tokens at all (exit 0): the model learns text-only priors")
    ap.add_argument("--exit-start", type=float, default=0.3, help="fraction of stage 2 before withdrawal starts")
    ap.add_argument("--eval-every", type=int, default=900)
    ap.add_argument("--seed", type=int, default=1, help="the shipped run; seed 0 at batch 48 stalled at 88%%")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init-std", type=float, default=INIT_STD)
    args = ap.parse_args(argv)
    globals()["INIT_STD"] = args.init_std

    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from dyvte.data import Batcher, num_visual_tokens
    from dyvte.exits import ExitModel, answer_loss
    from dyvte.models import quiet_transformers
    from dyvte.synth import HELDOUT_SEED, TRAIN_SEED, make_sample
    from dyvte.tiny import build_config, build_processor, build_tiny_llava

    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    sp = spec()
    processor = build_processor(sp)
    config = build_config(sp)
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).train()
    em = ExitModel(model)
    n_vis = num_visual_tokens(processor)
    pad = processor.tokenizer.pad_token_id
    aligner = Aligner(processor.tokenizer)
    train = make_pool(TRAIN_SEED, args.train_samples, processor, n_vis, "train data", args.turns)
    held = make_pool(HELDOUT_SEED, args.eval_samples, processor, n_vis, "held-out data")
    first = make_sample(HELDOUT_SEED, 0)
    assert held[0][0] == Batcher(processor, em.family).encode(first.question, first.answer, first.image)[0], \
        "tokenisation drifted"
    ref = processor.image_processor([Image.fromarray(train[0][2])], return_tensors="pt")["pixel_values"]
    assert torch.allclose(collate(train[:1], processor, pad)[3], ref, atol=1e-5), "fast preprocessing drifted"
    embed = model.model.language_model.embed_tokens.weight
    t0 = time.time()

    def say(msg):
        print(f"{time.time() - t0:6.0f}s  {msg}", file=sys.stderr, flush=True)

    # stage 1: alignment (vision tower + projector; the word embeddings stay fixed)
    vis_params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW(vis_params, lr=args.lr)
    for step in range(args.align_steps):
        items = rng.sample(train, 128)
        *_, px, cells = collate(items, processor, pad)
        loss = aligner.loss(em.image_features(px), cells, embed.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.align_steps - 1:
            say(f"align step {step:5d}  loss {loss.item():.4f}")

    # stage 2: instruction tuning with visual-token withdrawal
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, args.steps // 20)

    def lr_at(s):
        return args.lr * min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    L = sp.num_layers
    order, pos, log = list(range(len(train))), len(train), []
    for step in range(args.steps):
        if pos + args.batch > len(order):
            rng.shuffle(order)
            pos = 0
        items = [train[i] for i in order[pos: pos + args.batch]]
        pos += args.batch
        ids, mask, labels, px, cells = collate(items, processor, pad)
        k = None
        if step >= args.exit_start * args.steps:
            r = rng.random()
            if r < args.blind_prob:
                k = 0
            elif r < args.blind_prob + args.exit_prob:
                k = rng.randint(args.exit_min, L - 1)
        feats = em.image_features(px)
        logits, index, m = em.forward(ids, px, mask, k, image_features=feats)
        loss = answer_loss(logits, index, m, labels)
        if args.align_weight:
            loss = loss + args.align_weight * aligner.loss(feats, cells, embed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            say(f"step {step:5d}  loss {loss.item():.4f}  exit {k}")
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            acc, per = evaluate(em, held, processor, pad)
            acc0, _ = evaluate(em, held, processor, pad, exit_layer=0)
            row = {"step": step + 1, "heldout_acc": round(acc, 4), "acc_exit0": round(acc0, 4), "per_type": per,
                   "time_s": round(time.time() - t0)}
            say(json.dumps(row))
            log.append(row)
            model.train()
    model.eval()
    curve = {k: round(evaluate(em, held, processor, pad, exit_layer=k)[0], 4) for k in range(L + 1)}
    say("held-out accuracy by exit layer: " + json.dumps(curve))
    model.config._attn_implementation = "eager"
    build_tiny_llava(sp, args.out, model=model)
    (args.out / "training_log.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "log": log, "accuracy_by_exit": curve,
        "train_seconds": round(time.time() - t0), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2))
    say(f"saved {args.out}")


if __name__ == "__main__":
    main()
