"""Accuracy, exit layers, FLOPs and latency of exit policies and prune specs on a LLaVA-format dataset.

Accuracy is normalised exact match (lower case, punctuation and articles removed) of the
generated answer. TFLOPs per sample follow :mod:`dyvte.flops` on the tokens each layer saw (the
run's token plan: exit and pruning): vision tower, decoder (prefill and every generated token)
and lm_head; the gate's own cost is added for policy ``gate``; choosing pruned tokens is not
counted. ``decoder_tflops`` counts the decoder layers alone.

A run is a policy with an optional prune spec, named ``policy`` or ``policy+spec``
(``gate+divprune:0.5``); :func:`frontier_runs` is the grid of the accuracy-vs-decoder-FLOPs view.
"""

from __future__ import annotations

import statistics
import string
from pathlib import Path

ARTICLES = {"a", "an", "the"}

#: Drop shares of the frontier grid's pruning runs.
FRONTIER_SHARES = (0.25, 0.5, 0.75, 0.9)


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


def run_name(policy: str, spec: str | None) -> str:
    """``policy`` or ``policy+spec``."""
    return policy if not spec else f"{policy}+{spec}"


def frontier_runs(manifest, shares=FRONTIER_SHARES) -> list[tuple[str, str | None]]:
    """The accuracy-vs-decoder-FLOPs grid: the default policies; DivPrune and FastV alone (policy
    ``never``) at every share, FastV at the folder's first boundary and at its first boundary
    >= L/4 (FastV prunes early: K = 2 of LLaVA's 32 layers); each of them composed with the gate,
    and the gate with DivPrune and FastV together."""
    runs = [(p, None) for p in default_policies(manifest)]
    L, bounds = manifest.num_layers, manifest.boundaries
    ks = sorted({bounds[0], next((k for k in bounds if k >= L / 4), bounds[-1])}) if bounds else []
    specs = [f"divprune:{r:g}" for r in shares] + [f"fastv:{k}:{r:g}" for k in ks for r in shares]
    runs += [("never", spec) for spec in specs]
    if manifest.gate is not None:
        runs += [("gate", spec) for spec in specs]
        runs += [("gate", f"divprune:{r:g},fastv:{ks[-1]}:{r:g}") for r in shares[:2]] if ks else []
    return runs


def evaluate(engine_dir, data=None, image_root=None, policies=None, backend="auto", max_samples=None,
             max_new_tokens: int = 8, gate_threshold: float = 0.5, progress: bool = True, prune=(None,),
             runs=None) -> tuple[dict, list]:
    """Returns ({run: metrics}, per-sample rows). Runs: every policy (default
    :func:`default_policies`) with every spec of ``prune`` (None: no pruning), or ``runs``
    [(policy, spec)] as given (e.g. :func:`frontier_runs`)."""
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
        if runs is None:
            pols = list(policies) if policies else default_policies(m)
            runs = [(p, spec) for spec in (prune or (None,)) for p in pols]
        plans = {run_name(p, spec): pipe.plan(p, gate_threshold, spec) for p, spec in runs}  # fail early on bad input
        t = m.text
        segments = [seg.layers for seg in m.segments]
        gate_hidden = int(m.gate.info.get("hidden", 0)) if m.gate else 0
        encoded = [pipe.encode(s.image, s.question) for s in qa]
        rows = []
        bar = tqdm(total=len(qa) * len(plans), desc="eval", unit="run", disable=not progress)
        for (pol, spec), name in zip(runs, plans):
            for s, req in zip(qa, encoded):
                req.max_new_tokens = max_new_tokens
                r = pipe.run([req], policy=pol, gate_threshold=gate_threshold, prune=spec)[0]
                k = r.exit_layer  # k = 0 only for layer:0, which skips the vision tower
                tokens = flops.layer_tokens(segments, r.segment_tokens)
                vis = flops.manifest_vision_flops(m, r.image_tiles, r.image_grids) if k > 0 else 0.0
                n_new = len(r.token_ids)
                dec_layers = flops.plan_prefill_flops(t, tokens, head=False) + flops.plan_decode_flops(
                    t, tokens, n_new, head=False)
                total = (flops.plan_prefill_flops(t, tokens, vis, len(r.gate_probs), gate_hidden)
                         + flops.plan_decode_flops(t, tokens, n_new))
                rows.append({"policy": name, "exit_policy": pol, "prune": spec, "type": s.qtype, "answer": s.answer,
                             "output": r.text, "correct": normalize(r.text) == normalize(s.answer), "exit_layer": k,
                             "tflops": total / 1e12, "decoder_tflops": dec_layers / 1e12,
                             "latency_s": r.timings["total_s"], "prompt_tokens": len(req.input_ids),
                             "visual_tokens": r.visual_tokens,
                             "visual_token_layers": sum(tokens) - len(tokens) * (len(req.input_ids) - r.visual_tokens)})
                bar.update(1)
        bar.close()
    finally:
        pipe.close()
    return summarize(rows, list(plans)), rows


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
            "prune": rs[0]["prune"],
            "mean_visual_token_layers": statistics.fmean(r["visual_token_layers"] for r in rs),
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
    """One row per run; FLOPs per sample in GFLOPs (total, and decoder layers alone)."""
    base = summary.get("never")
    w = max(10, *(len(p) + 2 for p in summary))
    lines = [f"{'policy':<{w}}{'accuracy':>9}{'exit layer':>11}{'GFLOPs':>9}{'decoder':>9}{'latency ms':>11}"]
    for pol, s in summary.items():
        cut = ""
        if base and pol != "never" and base["decoder_tflops"]:
            cut = f"  ({100 * (s['decoder_tflops'] / base['decoder_tflops'] - 1):+.0f}% decoder FLOPs)"
        lines.append(f"{pol:<{w}}{100 * s['accuracy']:>8.1f}%{s['mean_exit_layer']:>8.2f}/{num_layers:<2}"
                     f"{s['tflops'] * 1e3:>9.4g}{s['decoder_tflops'] * 1e3:>9.4g}{s['latency_s'] * 1e3:>11.1f}{cut}")
    return "\n".join(lines)


def method(name: str) -> str:
    """The method family of a run name, for the frontier view: never, gate, vtw, static exit,
    fastv, divprune, divprune+fastv, or gate+<pruning>."""
    pol, _, spec = name.partition("+")
    kinds = "+".join(sorted({item.split(":")[0] for item in spec.split(",")})) if spec else ""
    base = "static exit" if pol.startswith("layer:") else pol
    if not kinds:
        return base
    return kinds if base == "never" else f"{base}+{kinds}"


def pareto(summary: dict) -> set:
    """Runs no other run beats (at most its decoder FLOPs with higher accuracy, or lower FLOPs at
    equal accuracy)."""
    out = set()
    for a, s in summary.items():
        if not any(o["decoder_tflops"] <= s["decoder_tflops"] and o["accuracy"] >= s["accuracy"]
                   and (o["decoder_tflops"] < s["decoder_tflops"] or o["accuracy"] > s["accuracy"])
                   for b, o in summary.items() if b != a):
            out.add(a)
    return out


def format_frontier(summary: dict) -> str:
    """Runs sorted by decoder FLOPs (% of never's), accuracy, the mean visual tokens x layers the
    decoder saw, and the Pareto front (*)."""
    base = summary.get("never")
    front = pareto(summary)
    w = max(10, *(len(p) + 2 for p in summary))
    ref = base["decoder_tflops"] if base else max(s["decoder_tflops"] for s in summary.values())
    acc0 = base["accuracy"] if base else None
    mw = max(8, *(len(method(p)) + 2 for p in summary))
    lines = [f"{'run':<{w}}{'method':<{mw}}{'accuracy':>9}{'vs never':>9}{'decoder FLOPs':>15}{'vis x layers':>13}"
             "  front"]
    for name, s in sorted(summary.items(), key=lambda kv: (kv[1]["decoder_tflops"], -kv[1]["accuracy"])):
        delta = f"{100 * (s['accuracy'] - acc0):+.1f}" if acc0 is not None else ""
        lines.append(f"{name:<{w}}{method(name):<{mw}}{100 * s['accuracy']:>8.1f}%{delta:>9}"
                     f"{100 * s['decoder_tflops'] / ref:>14.1f}%{s.get('mean_visual_token_layers', 0):>13.0f}"
                     f"  {'*' if name in front else ''}".rstrip())
    return "\n".join(lines)


def plot(summary: dict, rows: list[dict], num_layers: int, candidates: list[int], out_dir: Path) -> list[Path]:
    """Fig. 4 (accuracy vs fixed exit layer) and Fig. 6 (gate exit layers per question type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fixed = sorted((int(p.split(":")[1]), s) for p, s in summary.items() if method(p) == "static exit")
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
    if any(s.get("prune") for s in summary.values()):
        written.append(plot_frontier(summary, out_dir / "accuracy_vs_decoder_flops.png"))
    return written


#: Marker and colour of each method family in the frontier plot.
_STYLE = {"never": ("o", "black"), "gate": ("*", "tab:red"), "vtw": ("s", "tab:purple"),
          "static exit": ("o", "tab:gray"), "divprune": ("D", "tab:blue"), "fastv": ("^", "tab:green"),
          "divprune+fastv": ("v", "tab:cyan"), "gate+divprune": ("P", "tab:orange"), "gate+fastv": ("X", "tab:brown"),
          "gate+divprune+fastv": ("h", "tab:pink")}


def plot_frontier(summary: dict, path: Path) -> Path:
    """Accuracy vs decoder FLOPs (% of never's) of every run: one series per method family (and
    per FastV layer), the Pareto front dashed; the right panel zooms on the top 10 points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = summary.get("never")
    ref = base["decoder_tflops"] if base else max(s["decoder_tflops"] for s in summary.values())
    series: dict[str, list] = {}
    for name, s in summary.items():
        label = method(name)
        spec = s.get("prune") or ""
        ks = sorted({item.split(":")[1] for item in spec.split(",") if item.startswith("fastv:")})
        if ks:
            label += f" (K={','.join(ks)})"
        series.setdefault(label, []).append((100 * s["decoder_tflops"] / ref, 100 * s["accuracy"], name))
    front = sorted((100 * summary[n]["decoder_tflops"] / ref, 100 * summary[n]["accuracy"]) for n in pareto(summary))
    top = max(p[1] for pts in series.values() for p in pts)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, zoom in zip(axes, (False, True)):
        seen: dict[str, int] = {}
        for label, pts in series.items():
            pts.sort()
            family = label.split(" (")[0]
            marker, color = _STYLE.get(family, ("o", None))
            shade = seen[family] = seen.get(family, -1) + 1  # a second FastV layer: a lighter shade
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls="-" if len(pts) > 1 else "", lw=1,
                    color=color, alpha=0.9 if not shade else 0.5, mfc="white" if shade else color,
                    ms=12 if marker == "*" else 6, label=label)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", ls="--", lw=1,
                label="Pareto front")
        if base:
            ax.axhline(100 * base["accuracy"] - 1, color="gray", ls=":", lw=1, label="never - 1 point")
        ax.set_xlabel("decoder FLOPs per sample (% of never)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(top - 10, top + 0.5)
            ax.set_title("zoom: the top 10 points")
        else:
            ax.set_title("Accuracy vs decoder FLOPs: exits, pruning, compositions")
            ax.legend(fontsize=7, loc="lower right", ncol=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
