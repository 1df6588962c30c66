"""Train DyVTE gates on a frozen LLaVA (paper Eq. 5-7), resumably.

Phase 1, labels: each sample runs once normally (teacher-forced on its answer) and, for every
candidate layer l, once with the visual tokens removed before l. The exit runs reuse the normal
run's hidden state entering layer l and recompute only layers [l, L) on the text tokens, so
labels for all candidates cost little more than one forward pass. Label 1 iff the argmax tokens
agree on more than ``agree`` of the answer positions and the exit run's mean answer
cross-entropy is below ``alpha`` x the normal run's. The gate features [mean(text[:-1]),
text[-1]] (text = prompt tokens after the image) are stored with the labels in shards.

Phase 2, gates: one MLP per candidate (Linear(2d, h) -> GELU -> Linear(h, 2), no bias,
xavier-uniform init) trained with cross-entropy and AdamW (warm-up, cosine decay) on the stored
features. Every candidate's gate sees every sample (the reference samples one layer per step).

Both phases checkpoint into ``workdir``; re-running the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError


@dataclass
class GateTrainSettings:
    out: Path  # gates safetensors (contract format)
    model: str | None = None  # HF LLaVA checkpoint (folder, repo id, preset); None = demo model
    data: Path | None = None  # LLaVA-format JSON; None = the demo's synthetic training split
    image_root: Path | None = None
    candidates: list[int] | None = None
    samples: int | None = None  # use at most this many samples
    epochs: int = 1
    lr: float = 6e-5
    batch_size: int = 128  # samples per gate update
    forward_batch: int = 8  # samples per frozen-model forward
    hidden: int = 2048
    alpha: float = 1.03
    agree: float = 0.99
    warmup: float = 0.03
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    workdir: Path | None = None  # None: <out>.work
    shard_size: int = 256
    checkpoint_every: int = 50  # gate-update steps between checkpoints
    progress: bool = True
    log: object = field(default=None, repr=False)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gate_features(hidden, prompt_lengths, visual):
    """[mean(text[:-1]), text[-1]] per row. hidden [B,S,D]; text = prompt tokens after the last
    visual token; one text token -> both halves are that token. Returns [B,2D] float32."""
    import torch

    from dyvte.exporter.modules import gate_features as eq1_features

    B, S, _ = hidden.shape
    cols = torch.arange(S, device=hidden.device)[None]
    last_visual = torch.where(visual, cols, -1).max(1).values  # [B]
    last = prompt_lengths - 1
    text = (cols > last_visual[:, None]) & (cols < last[:, None])  # [B,S]
    h = hidden.float()
    return eq1_features(h, text, h[torch.arange(B, device=h.device), last])  # right padding: gather the last


def answer_stats(logits, index, mask, labels):
    """Per row: argmax tokens on answer positions [B,S] (masked), mean answer CE [B]."""
    from .exits import answer_loss

    ce, valid, target = answer_loss(logits, index, mask, labels, reduction="none")
    mean_ce = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)
    return logits.argmax(-1), valid, mean_ce


def _load_qa(s: GateTrainSettings):
    from .data import records_to_qa
    from .synth import demo_split, load_records

    if s.data is None:
        n = s.samples or 4000
        path, root = demo_split("train", n)
        return records_to_qa(load_records(path), root, n)
    return records_to_qa(load_records(s.data), s.image_root, s.samples)


def _gate_logits(f, fc1, fc2):
    """All gates at once: f [b,K,2d], fc1 [K,h,2d], fc2 [K,2,h] -> logits [b,K,2]."""
    import torch

    h = torch.nn.functional.gelu(torch.einsum("bkd,khd->bkh", f, fc1))
    return torch.einsum("bkh,kch->bkc", h, fc2)


def _gate_step(f, y, fc1, fc2, opt, lr: float) -> float:
    """One AdamW update of every gate on a minibatch; returns the mean per-gate loss."""
    import torch

    logits = _gate_logits(f, fc1, fc2)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    (loss * f.shape[1]).backward()  # sum over gates: each gate gets its own mean-CE gradient
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss.item()


def train_gates(s: GateTrainSettings) -> dict:
    """Run both phases; writes ``s.out`` (+ ``<out>.json`` report) and returns the report."""
    import torch
    from tqdm.auto import tqdm

    from dyvte.engines.files import write_json
    from dyvte.gates import save_gates
    from dyvte.models import load_model, load_processor, locate_model
    from dyvte.settings import default_candidates

    from .data import Batcher
    from .exits import ExitModel

    log = s.log or (lambda msg: None)
    if s.epochs < 1 or s.batch_size < 1 or s.forward_batch < 1 or s.hidden < 1:
        raise InputError("epochs, batch sizes and hidden must be positive")
    if not 0 < s.agree < 1 or s.alpha <= 0:  # labels need agreement > agree: 1 would label nothing
        raise InputError("--agree must be in (0, 1) and --alpha positive")
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = locate_model(s.model)
    qa = _load_qa(s)
    model = load_model(model_dir, "float32" if device.type == "cpu" else "bfloat16").to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    processor = load_processor(model_dir)
    em = ExitModel(model)
    L = em.num_layers
    from dyvte.exporter.export_model import check_candidates

    cands = check_candidates(s.candidates if s.candidates is not None else default_candidates(L), L)
    d = model.config.text_config.hidden_size
    work = Path(s.workdir or Path(str(s.out) + ".work"))
    work.mkdir(parents=True, exist_ok=True)
    key = _digest([str(model_dir), sorted(p.stat().st_size for p in model_dir.glob("*.safetensors")), cands,
                   [(str(q.image), q.question, q.answer) for q in qa], s.alpha, s.agree, s.shard_size])
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("labels_key") != key:  # another model/data/criterion: drop our own files only
        for p in [*work.glob("labels_*.safetensors"), work / "gates_checkpoint.safetensors"]:
            p.unlink(missing_ok=True)
        state = {"labels_key": key}
        write_json(state_path, state)
    batcher = Batcher(processor, em.family)

    # -- phase 1: labels and features ---------------------------------------------------------
    shards = [(i, min(i + s.shard_size, len(qa))) for i in range(0, len(qa), s.shard_size)]
    done = [a for a, _ in shards if (work / f"labels_{a:07d}.safetensors").is_file()]
    if done:
        log(f"resuming labels: {len(done)} of {len(shards)} shards already computed in {work}")
    from safetensors.torch import load_file, save

    from dyvte.engines.files import write_atomic

    bar = tqdm(total=len(qa), desc="labels", unit="sample", disable=not s.progress,
               initial=sum(b - a for a, b in shards if a in done))
    with torch.no_grad():
        for a, b in shards:
            if a in done:
                continue
            feats, labels, ce_n = [], [], []
            for i in range(a, b, s.forward_batch):
                batch = batcher(qa[i: min(i + s.forward_batch, b)], device)
                seq = em.embed(batch.input_ids, batch.vision, batch.attention_mask)
                out, entering = em.layers(seq, 0, L, collect=set(cands))
                logits = em.head(out.hidden)
                pred_n, valid, ce_norm = answer_stats(logits, out.index, out.mask, batch.labels)
                f_rows, y_rows = [], []
                for k in cands:
                    f_rows.append(gate_features(entering[k], batch.prompt_lengths, seq.visual))
                    start = type(seq)(entering[k], seq.position_ids, seq.mask, seq.visual, seq.index)
                    ex, _ = em.layers(em.drop_visual(start), k, L)
                    pred_e, valid_e, ce_exit = answer_stats(em.head(ex.hidden), ex.index, ex.mask, batch.labels)
                    a_n = [row[v] for row, v in zip(pred_n, valid)]
                    a_e = [row[v] for row, v in zip(pred_e, valid_e)]
                    agree = torch.tensor([(x == y).float().mean().item() if len(x) == len(y) and len(x) else 0.0
                                          for x, y in zip(a_n, a_e)], device=device)
                    y_rows.append(((agree > s.agree) & (ce_exit < s.alpha * ce_norm)).long())
                feats.append(torch.stack(f_rows, 1).cpu())  # [b,K,2d]
                labels.append(torch.stack(y_rows, 1).cpu())  # [b,K]
                ce_n.append(ce_norm.float().cpu())
                bar.update(len(batch.qtypes))
            write_atomic(work / f"labels_{a:07d}.safetensors",
                         save({"features": torch.cat(feats), "labels": torch.cat(labels), "ce": torch.cat(ce_n)}))
    bar.close()
    data = [load_file(str(work / f"labels_{a:07d}.safetensors")) for a, _ in shards]
    F = torch.cat([x["features"] for x in data]).float()  # [N,K,2d]
    Y = torch.cat([x["labels"] for x in data])  # [N,K]
    pos_rate = {int(k): round(float(Y[:, j].float().mean()), 4) for j, k in enumerate(cands)}
    log("label positive rate per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in pos_rate.items()))

    # -- phase 2: gates ------------------------------------------------------------------------
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    fc1 = torch.nn.Parameter(torch.empty(len(cands), s.hidden, 2 * d))
    fc2 = torch.nn.Parameter(torch.empty(len(cands), 2, s.hidden))
    for j in range(len(cands)):
        torch.nn.init.xavier_uniform_(fc1.data[j], generator=gen)
        torch.nn.init.xavier_uniform_(fc2.data[j], generator=gen)
    fc1.data, fc2.data = fc1.data.to(device), fc2.data.to(device)
    opt = torch.optim.AdamW([fc1, fc2], lr=s.lr, weight_decay=s.weight_decay)
    N = len(F)
    per_epoch = math.ceil(N / s.batch_size)
    total = per_epoch * s.epochs
    warm = max(1, int(s.warmup * total))

    def lr_at(t):  # linear warm-up, cosine decay to 0
        return s.lr * min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, t / total)))
    ckpt = work / "gates_checkpoint.safetensors"
    train_key = _digest([key, s.hidden, s.lr, s.batch_size, s.epochs, s.warmup, s.weight_decay, s.seed])
    step = 0
    if ckpt.is_file() and state.get("train_key") == train_key:
        c = load_file(str(ckpt))
        fc1.data.copy_(c["fc1"])
        fc2.data.copy_(c["fc2"])
        opt.state[fc1] = {"step": c["fc1.step"], "exp_avg": c["fc1.exp_avg"].to(device), "exp_avg_sq": c["fc1.exp_avg_sq"].to(device)}
        opt.state[fc2] = {"step": c["fc2.step"], "exp_avg": c["fc2.exp_avg"].to(device), "exp_avg_sq": c["fc2.exp_avg_sq"].to(device)}
        step = int(c["step"])
        log(f"resuming gate training at step {step} of {total}")
    state["train_key"] = train_key
    write_json(state_path, state)

    def save_ckpt():
        st1, st2 = opt.state.get(fc1, {}), opt.state.get(fc2, {})
        tensors = {"fc1": fc1.detach().cpu(), "fc2": fc2.detach().cpu(), "step": torch.tensor(step)}
        for name, st in (("fc1", st1), ("fc2", st2)):
            if st:
                tensors[f"{name}.step"] = torch.as_tensor(st["step"]).cpu()
                tensors[f"{name}.exp_avg"] = st["exp_avg"].cpu()
                tensors[f"{name}.exp_avg_sq"] = st["exp_avg_sq"].cpu()
        write_atomic(ckpt, save(tensors))

    rng = random.Random(s.seed)
    orders = []
    for _ in range(s.epochs):
        o = list(range(N))
        rng.shuffle(o)
        orders.append(o)
    flat = [i for o in orders for i in o]
    bar = tqdm(total=total, desc="gates", unit="step", disable=not s.progress, initial=step)
    losses = []
    while step < total:
        e, j = divmod(step, per_epoch)
        idx = torch.tensor(flat[e * N + j * s.batch_size: e * N + min((j + 1) * s.batch_size, N)])
        loss = _gate_step(F[idx].to(device), Y[idx].to(device), fc1, fc2, opt, lr_at(step))
        step += 1
        losses.append(loss)
        bar.update(1)
        if step % s.checkpoint_every == 0 or step == total:
            save_ckpt()
    bar.close()
    with torch.no_grad():
        pred = torch.cat([_gate_logits(F[i: i + 4096].to(device), fc1, fc2).argmax(-1).cpu() for i in range(0, N, 4096)])
    train_acc = {int(k): round(float((pred[:, j] == Y[:, j]).float().mean()), 4) for j, k in enumerate(cands)}
    gates = {k: (fc1[j].detach().cpu(), fc2[j].detach().cpu()) for j, k in enumerate(cands)}
    Path(s.out).parent.mkdir(parents=True, exist_ok=True)
    save_gates(s.out, gates, {"model": str(model_dir), "alpha": s.alpha, "samples": N})
    report = {
        "model": str(model_dir),
        "samples": N,
        "candidates": cands,
        "positive_rate": pos_rate,
        "train_accuracy": train_acc,
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5) if losses else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items() if k != "log"},
    }
    write_json(Path(str(s.out) + ".json"), report)
    log(f"wrote {s.out}")
    return report
