"""Accuracy, exit layers, FLOPs and latency of exit policies on a LLaVA-format dataset.

Accuracy is normalised exact match (lower case, punctuation and articles removed) of the
generated answer. TFLOPs per sample follow :mod:`dyvte.flops`: vision tower, decoder (prefill
and every generated token) and lm_head; the gate's own cost is added for policy ``gate``.
``decoder_tflops`` counts the decoder layers alone.
"""

from __future__ import annotations

import statistics
import string
from pathlib import Path

ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ARTICLES)


def default_policies(manifest) -> list[str]:
    pols = ["never"]
    if manifest.gate is not None:
        pols.append("gate")
    if manifest.calibration.get("vtw"):
        pols.append("vtw")
    return pols + [f"layer:{k}" for k in [0, *manifest.candidates]]


def evaluate(engine_dir, data=None, image_root=None, policies=None, backend="auto", max_samples=None,
             max_new_tokens: int = 8, gate_threshold: float = 0.5, progress: bool = True) -> tuple[dict, list]:
    """Returns ({policy: metrics}, per-sample rows)."""
    from tqdm.auto import tqdm

    from dyvte import flops
    from dyvte.data import records_to_qa
    from dyvte.runtime import Pipeline
    from dyvte.synth import demo_split, load_records

    if data is None:
        data, image_root = demo_split("heldout", max_samples or 600)
    qa = records_to_qa(load_records(data), image_root, max_samples)
    pipe = Pipeline.load(engine_dir, backend=backend)
    try:
        m = pipe.manifest
        policies = list(policies) if policies else default_policies(m)
        for p in policies:
            pipe.policy(p)  # fail early on an unknown or unavailable policy
        t = m.text
        gate_hidden = int(m.gate.info.get("hidden", 0)) if m.gate else 0
        encoded = [pipe.encode(s.image, s.question) for s in qa]
        rows = []
        bar = tqdm(total=len(qa) * len(policies), desc="eval", unit="run", disable=not progress)
        for pol in policies:
            for s, req in zip(qa, encoded):
                req.max_new_tokens = max_new_tokens
                r = pipe.run([req], policy=pol, gate_threshold=gate_threshold)[0]
                T, k = len(req.input_ids), r.exit_layer  # k = 0 only for layer:0, which skips the vision tower
                n_vis, vis = r.visual_tokens, flops.manifest_vision_flops(m, r.image_tiles, r.image_grids)
                n_new = len(r.token_ids)
                dec_layers = (flops.prefill_flops(t, T, n_vis, k, head=False)
                              + flops.decode_flops(t, T, n_vis, k, n_new, head=False))
                total = (flops.prefill_flops(t, T, n_vis, k, vis if k > 0 else 0.0, len(r.gate_probs), gate_hidden)
                         + flops.decode_flops(t, T, n_vis, k, n_new))
                rows.append({"policy": pol, "type": s.qtype, "answer": s.answer, "output": r.text,
                             "correct": normalize(r.text) == normalize(s.answer), "exit_layer": k,
                             "tflops": total / 1e12, "decoder_tflops": dec_layers / 1e12,
                             "latency_s": r.timings["total_s"], "prompt_tokens": T})
                bar.update(1)
        bar.close()
    finally:
        pipe.close()
    return summarize(rows, policies), rows


def summarize(rows: list[dict], policies: list[str]) -> dict:
    out = {}
    for pol in policies:
        rs = [r for r in rows if r["policy"] == pol]
        types = sorted({r["type"] for r in rs})
        out[pol] = {
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "mean_exit_layer": statistics.fmean(r["exit_layer"] for r in rs),
            "tflops": statistics.fmean(r["tflops"] for r in rs),
            "decoder_tflops": statistics.fmean(r["decoder_tflops"] for r in rs),
            "latency_s": statistics.median(r["latency_s"] for r in rs),
            "samples": len(rs),
            "per_type": {
                ty: {
                    "accuracy": sum(r["correct"] for r in rs if r["type"] == ty) / sum(1 for r in rs if r["type"] == ty),
                    "mean_exit_layer": statistics.fmean(r["exit_layer"] for r in rs if r["type"] == ty),
                    "samples": sum(1 for r in rs if r["type"] == ty),
                }
                for ty in types
            },
        }
    return out


def format_table(summary: dict, num_layers: int) -> str:
    base = summary.get("never")
    """One row per policy; FLOPs per sample in GFLOPs (total, and decoder layers alone)."""
    lines = [f"{'policy':<10}{'accuracy':>9}{'exit layer':>11}{'GFLOPs':>9}{'decoder':>9}{'latency ms':>11}"]
    for pol, s in summary.items():
        cut = ""
        if base and pol != "never" and base["decoder_tflops"]:
            cut = f"  ({100 * (s['decoder_tflops'] / base['decoder_tflops'] - 1):+.0f}% decoder FLOPs)"
        lines.append(f"{pol:<10}{100 * s['accuracy']:>8.1f}%{s['mean_exit_layer']:>8.2f}/{num_layers:<2}"
                     f"{s['tflops'] * 1e3:>9.4g}{s['decoder_tflops'] * 1e3:>9.4g}{s['latency_s'] * 1e3:>11.1f}{cut}")
    return "\n".join(lines)


def plot(summary: dict, rows: list[dict], num_layers: int, candidates: list[int], out_dir: Path) -> list[Path]:
    """Fig. 4 (accuracy vs fixed exit layer) and Fig. 6 (gate exit layers per question type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fixed = sorted((int(p.split(":")[1]), s) for p, s in summary.items() if p.startswith("layer:"))
    if fixed:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = [k for k, _ in fixed] + ([num_layers] if "never" in summary else [])
        ys = [100 * s["accuracy"] for _, s in fixed] + ([100 * summary["never"]["accuracy"]] if "never" in summary else [])
        ax.plot(xs, ys, "o-", label="fixed exit layer:K")
        if "never" in summary:
            ax.axhline(100 * summary["never"]["accuracy"], color="gray", ls="--", lw=1, label="never (baseline)")
        for pol, marker in (("gate", "*"), ("vtw", "s")):
            if pol in summary:
                s = summary[pol]
                ax.plot([s["mean_exit_layer"]], [100 * s["accuracy"]], marker, ms=12 if marker == "*" else 8,
                        label=f"{pol} (mean exit {s['mean_exit_layer']:.1f})")
        ax.set_xlabel("exit layer (visual tokens dropped before it)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy vs visual-token exit layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        written.append(_save(fig, out_dir / "accuracy_vs_exit_layer.png"))
    gate_rows = [r for r in rows if r["policy"] == "gate"]
    if gate_rows:
        types = sorted({r["type"] for r in gate_rows})
        layers = [*candidates, num_layers]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(types)
        for i, ty in enumerate(types):
            rs = [r for r in gate_rows if r["type"] == ty]
            frac = [sum(r["exit_layer"] == k for r in rs) / len(rs) for k in layers]
            ax.bar([j + i * width for j in range(len(layers))], frac, width, label=ty)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [str(k) for k in layers])
        ax.set_xlabel(f"gate exit layer ({num_layers} = no exit)")
        ax.set_ylabel("fraction of samples")
        ax.set_title("Where the gate drops the visual tokens, per question type")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        written.append(_save(fig, out_dir / "gate_exit_layers.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
