"""Per-part latency of an engine folder, end-to-end baseline vs DyVTE, and the equivalent
polygraphy commands.

Parts are timed through the runtime's Runner (any backend) on synthetic inputs of the folder's
shapes: a prompt of V visual + ``text_tokens`` text tokens; segments in their three modes (full
and text-only prefill, decode after a full prompt). Medians over ``reps`` runs, after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def _median_time(fn, runner, reps: int) -> float:
    fn()
    runner.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        runner.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def polygraphy_commands(manifest, text_tokens: int = 40, batch: int = 1) -> list[str]:
    """`polygraphy run` commands reproducing each part's profiled call (ONNX Runtime, and
    TensorRT plans when the folder has them)."""
    _, V = _image(manifest)
    T = V + text_tokens
    vocab = manifest.text["vocab_size"]
    plans = manifest.data.get("engines", {}).get("tensorrt", {}).get("parts", {})
    cmds = []

    def shapes_for(part, axes):
        out = []
        for t in part.inputs:
            dims = [axes.get(d, d) if isinstance(d, str) else d for d in t["shape"]]
            out.append(f"{t['name']}:[{','.join(map(str, dims))}]")
        return " ".join(out)

    ranges = {"attention_mask": "[1,1]", "position_ids": f"[0,{T}]", "input_ids": f"[0,{vocab - 1}]",
              "text_mask": "[0,1]", "gate_index": "[0,0]"}
    feeds = _vision_feeds(manifest)
    vision_axes = {}
    for t in manifest.parts["vision"].inputs:  # the named axes of one example image's feeds
        vision_axes.update({d: n for d, n in zip(t["shape"], feeds[t["name"]].shape) if isinstance(d, str)})
        if not feeds[t["name"]].is_floating_point():  # host-computed indices: keep them in range
            ranges[t["name"]] = f"[{int(feeds[t['name']].min())},{int(feeds[t['name']].max())}]"
    for name, part in manifest.parts.items():
        if part.kind == "segment":
            modes = [("full", {"batch": batch, "seq": T, "past": 0}, 0),
                     ("text", {"batch": batch, "seq": text_tokens, "past": 0}, 1),
                     ("decode", {"batch": batch, "seq": 1, "past": T}, 2)]
        else:
            seq = {"embed": T, "gate": T, "head": 1}.get(part.kind, 1)
            modes = [("default", {"batch": batch, "seq": seq, **vision_axes}, 0)]
        names = {t["name"] for t in part.inputs}
        vr = " ".join(f"{k}:{v}" for k, v in ranges.items() if k in names)
        for mode, axes, prof in modes:
            axes["total"] = axes.get("past", 0) + axes["seq"]  # keys attended: cache + new tokens
            shp = shapes_for(part, axes)
            extra = f" --val-range {vr}" if vr else ""
            cmds.append(f"polygraphy run {part.onnx} --onnxrt --input-shapes {shp}{extra}  # {name} {mode}")
            if name in plans:
                cmds.append(f"polygraphy run {plans[name]['plan']} --model-type engine --trt --optimization-profile "
                            f"{prof} --input-shapes {shp}{extra}  # {name} {mode}")
    return cmds


def profile(engine_dir, backend: str = "auto", reps: int = 10, text_tokens: int = 40, decode_tokens: int = 16,
            policy: str | None = None, progress: bool = True) -> dict:
    """Per-part medians (seconds) and end-to-end prefill/decode for ``never`` vs ``policy``."""
    import torch

    from dyvte import flops
    from dyvte.runtime import Pipeline

    pipe = Pipeline.load(engine_dir, backend=backend)
    m, r = pipe.manifest, pipe.runner
    inputs, V = _image(m)
    D = m.text["hidden_size"]
    T = V + text_tokens
    g = torch.Generator().manual_seed(0)
    dev, dt = r.device, r.dtype
    feeds = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v).to(dev)
             for k, v in _vision_feeds(m).items()}  # random pixels, the family's index inputs
    ids = torch.randint(5, m.text["vocab_size"], (1, T), generator=g).to(dev)
    hidden = (torch.randn(1, T, D, generator=g) * 0.5).to(dev, dt)
    pos = torch.arange(T, device=dev)[None]  # [1,T]
    if m.text.get("mrope_section"):
        pos = pos.expand(3, 1, T)  # M-RoPE rows (t, h, w), the segment graph's [3,B,S]
    mask = torch.ones(1, T + decode_tokens + reps + 2, dtype=torch.int64, device=dev)
    slots = torch.arange(mask.shape[1], device=dev)[None]  # key positions: the prompt counts up, then decoding
    image = (slots < V).long()  # token groups: the prompt's first V tokens are one image
    d = pipe.dispatcher

    def extra(j, keys: slice, new: int):
        """The inputs segment j takes besides the standard ones (the family's, as the dispatcher feeds them)."""
        out = {name: {"key_positions": slots, "token_groups": image}[name][:, keys] for name in d.key_inputs[j]}
        for name, (shape, dtype) in d.data_inputs[j].items():
            out[name] = torch.zeros(1, new, *shape, dtype=getattr(torch, dtype), device=dev)
        return out or None

    parts = {}
    with torch.inference_mode():
        parts["vision"] = _median_time(lambda: r.vision(feeds), r, reps)
        parts["embed"] = _median_time(lambda: r.embed(ids), r, reps)
        for j, seg in enumerate(m.segments):
            def full():
                r.segment(j, hidden, pos, mask[:, :T], r.new_cache(j, 1, T + 1), "full", extra(j, slice(0, T), T))

            def text():
                r.segment(j, hidden[:, V:], pos[..., V:], mask[:, :text_tokens], r.new_cache(j, 1, text_tokens + 1),
                          "text", extra(j, slice(V, T), text_tokens))

            cache = r.new_cache(j, 1, T + reps + 2)
            r.segment(j, hidden, pos, mask[:, :T], cache, "full", extra(j, slice(0, T), T))

            def decode():
                P = cache.length
                r.segment(j, hidden[:, -1:], pos[..., -1:] + 1, mask[:, : P + 1], cache, "decode",
                          extra(j, slice(0, P + 1), 1))

            parts[f"{seg.name} full"] = _median_time(full, r, reps)
            parts[f"{seg.name} text"] = _median_time(text, r, reps)
            parts[f"{seg.name} decode"] = _median_time(decode, r, reps)
        if m.gate is not None:
            tm = torch.zeros(1, T, dtype=torch.int64, device=dev)
            tm[:, V:-1] = 1
            parts["gate"] = _median_time(lambda: r.gate(hidden, tm, 0), r, reps)
        parts["head"] = _median_time(lambda: r.head(hidden[:, -1:]), r, reps)
        policy = policy or ("gate" if m.gate is not None else f"layer:{m.candidates[len(m.candidates) // 2]}")
        ids_np, vision = _prompt(pipe, T)
        e2e = {}
        for pol in ("never", policy):
            runs = [pipe.generate_ids(ids_np, **vision, max_new_tokens=decode_tokens, policy=pol)
                    for _ in range(reps + 1)][1:]
            e2e[pol] = {
                "prefill_s": statistics.median(x.timings["prefill_s"] for x in runs),
                "decode_tokens_per_s": statistics.median(x.timings["decode_tokens_per_s"] for x in runs),
                "exit_layer": runs[0].exit_layer,
                "prefill_gflops": flops.prefill_flops(m.text, T, V, runs[0].exit_layer, flops.manifest_vision_flops(
                    m, runs[0].image_tiles, runs[0].image_grids)) / 1e9,
            }
    result = {"engine_dir": str(engine_dir), "backend": pipe.backend, "device": str(dev), "dtype": str(dt).split(".")[-1],
              "prompt_tokens": T, "visual_tokens": V, "reps": reps, "parts_s": parts, "end_to_end": e2e,
              "polygraphy": polygraphy_commands(m, text_tokens)}
    pipe.close()
    return result


def _image(manifest):
    """(processor tensors, visual tokens) of one synthetic image of the folder's family."""
    from dyvte.families import family_named

    return family_named(manifest.model["family"]).example(manifest.model["vision"])


def _vision_feeds(manifest) -> dict:
    """The vision graph's feeds for that synthetic image (its first call)."""
    from dyvte.families import family_named

    family, meta = family_named(manifest.model["family"]), manifest.model["vision"]
    inputs, _ = family.example(meta)
    return family.vision_calls(meta, [family.prepare(meta, inputs)])[0]


def _prompt(pipe, T):
    """A prompt of T tokens with one image (image tokens then text): ids [1,T] and the image's
    processor tensors, as numpy arrays."""
    import numpy as np

    m = pipe.manifest
    inputs, V = _image(m)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], np.full(V, m.model["image_token_id"]), rng.integers(5, m.text["vocab_size"], T - V - 1)])
    vision = {k: (rng.standard_normal(v.shape).astype(np.float32) if k == "pixel_values" else v.numpy())
              for k, v in inputs.items()}
    return ids[None].astype(np.int64), vision


def format_profile(res: dict) -> str:
    lines = [f"backend {res['backend']} on {res['device']} ({res['dtype']}), prompt {res['prompt_tokens']} tokens "
             f"({res['visual_tokens']} visual), median of {res['reps']}",
             f"{'part':<24}{'ms':>10}"]
    lines += [f"{k:<24}{v * 1e3:>10.2f}" for k, v in res["parts_s"].items()]
    e = res["end_to_end"]
    lines.append("")
    lines.append(f"{'end to end':<24}{'prefill ms':>11}{'decode tok/s':>14}{'exit':>6}{'GFLOPs':>9}")
    for pol, x in e.items():
        lines.append(f"{pol:<24}{x['prefill_s'] * 1e3:>11.1f}{x['decode_tokens_per_s']:>14.1f}{x['exit_layer']:>6}"
                     f"{x['prefill_gflops']:>9.2f}")
    pols = list(e)
    if len(pols) == 2 and e[pols[0]]["prefill_s"]:
        a, b = e[pols[0]], e[pols[1]]
        lines.append(f"{pols[1]}/never prefill time {b['prefill_s'] / a['prefill_s']:.3f}, "
                     f"FLOPs {b['prefill_gflops'] / a['prefill_gflops']:.3f}")
    return "\n".join(lines)


def plot_profile(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["parts_s"])
    vals = [res["parts_s"][n] * 1e3 for n in names]
    colors = ["#4c72b0" if "full" in n else "#dd8452" if "text" in n else "#55a868" if "decode" in n else "#8172b3"
              for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    ax.set_xlabel("median latency (ms)")
    ax.set_title(f"per-part latency ({res['backend']}, {res['device']}, {res['prompt_tokens']} tokens)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
