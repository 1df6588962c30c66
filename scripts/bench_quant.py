#!/usr/bin/env python
"""Fused and quantized engines on one CPU: float32 / int8 / int4 x never / layer:L/2, next to
Hugging Face eager ``generate``, measured side by side (interleaved) in one process.

    python scripts/bench_quant.py                      # d=1024, 16 layers, 576 visual + ~45 text tokens
    python scripts/bench_quant.py --demo-eval          # + demo accuracy (never, gate) per scheme

Builds (once, cached in --workdir) the random LLaVA of scripts/bench_prefill.py, exports it as a
float32 folder (plain + fused graphs) and with ``--quantize int8`` and ``--quantize int4``, and
reports for each scheme and policy, medians over --reps interleaved repetitions:

* prefill ms (vision + every segment + the first token) and decode tokens/s (``max_new_tokens``
  = --new-tokens; decode = tokens after the first / decode time), from the pipeline's timings;
* segment bytes (the decoder segments' files on disk) and their ratio to float32;
* peak resident memory of a fresh process that loads the folder and runs both policies once
  (``VmHWM``; each scheme in its own child process, so the others' weights do not count);
* float32 with its plain graphs (MatMul/Softmax attention, the TensorRT input) as a row of its own;
* Hugging Face ``LlavaForConditionalGeneration.generate`` (eager attention, float32, the same
  inputs): prefill = generate(1 token), decode tok/s = (N - 1) / (t(N) - t(1)).

Ratios printed: int8 and int4 decode / float32 decode, int4 prefill / float32 prefill, segment
bytes / float32, float32 decode / HF decode, and exit (layer:L/2) / never prefill next to the
FLOPs ratio for every scheme. ``--demo-eval`` exports the embedded demo model per scheme and runs
``dyvte eval`` (policies never and gate, held-out questions; deterministic). Small shapes
(``--hidden 64 --layers 2 --reps 1``) run anywhere (tests/test_scripts.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = ("float32", "int8", "int4")

_CHILD = r"""
import json, sys
import numpy as np
from dyvte.runtime import Pipeline
folder, ids, pixels, exit_k, n = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with Pipeline.load(folder, backend="onnxruntime", verify=False) as pipe:
    for policy in ("never", f"layer:{exit_k}"):
        pipe.generate_ids(ids, pixels, max_new_tokens=n, policy=policy)
with open("/proc/self/status") as f:
    print(json.dumps({"peak_rss": next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))}))
"""


def export_once(model_dir: Path, out: Path, quantize=None, log=print, **options):
    from dyvte.exporter import ExportSettings, export

    if not (out / "manifest.json").is_file():
        log(f"exporting {out}")
        export(ExportSettings(out=out, model=str(model_dir), quantize=quantize, progress=True, max_input_len=1024,
                              max_new_tokens=64, overwrite=True, log=log, **(options if quantize else {})))
    return out


def segment_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "onnx").glob("segment_*"))


def peak_rss(folder: Path, ids, pixels, exit_k: int, n: int, tmp: Path) -> float:
    import numpy as np

    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "pixels.npy", pixels)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(tmp / "ids.npy"), str(tmp / "pixels.npy"),
                          str(exit_k), str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def demo_eval(workdir: Path, samples: int) -> dict:
    """Demo accuracy (never, gate) per scheme: the embedded demo exported per scheme, dyvte eval."""
    from dyvte.evaluate import evaluate
    from dyvte.exporter import ExportSettings, export

    out = {}
    for scheme in SCHEMES:
        folder = workdir / f"demo-{scheme}"
        if not (folder / "manifest.json").is_file():
            export(ExportSettings(out=folder, quantize=None if scheme == "float32" else scheme, overwrite=True,
                                  progress=False))
        summary, _ = evaluate(folder, policies=["never", "gate"], backend="onnxruntime", max_samples=samples,
                              progress=False)
        out[scheme] = {p: summary[p]["accuracy"] for p in ("never", "gate")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("build/bench-quant"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=33, help="tokens per generate (decode = the ones after the 1st)")
    ap.add_argument("--block-size", type=int, default=None, help="--quantize block size (default dyvte's)")
    ap.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level (default dyvte's)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--demo-eval", action="store_true", help="also demo accuracy (never, gate) per scheme")
    ap.add_argument("--demo-samples", type=int, default=600)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    import torch
    from bench_prefill import PROMPT, build
    from PIL import Image

    from dyvte import flops
    from dyvte.models import load_model
    from dyvte.runtime import Pipeline
    from dyvte.runtime.inputs import encode

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.family = "llava"
    model_dir = build(args.workdir, args)
    tag = "".join(f"-{k}{v}" for k, v in (("b", args.block_size), ("a", args.accuracy_level)) if v is not None)
    folders = {s: export_once(model_dir, args.workdir / f"engine-{s}{tag if s != 'float32' else ''}",
                              None if s == "float32" else s, block_size=args.block_size,
                              accuracy_level=args.accuracy_level) for s in SCHEMES}
    pipes = {s: Pipeline.load(folders[s], backend="onnxruntime", verify=False) for s in SCHEMES}
    pipes["float32 plain"] = Pipeline.load(folders["float32"], backend="onnxruntime", graphs="plain", verify=False)
    L = args.layers
    k = L // 2
    if k not in pipes["float32"].candidates:
        k = min(pipes["float32"].candidates, key=lambda c: abs(c - L // 2))
    image = Image.fromarray((np.random.RandomState(0).rand(336, 336, 3) * 255).astype("uint8"))
    ids, vision = encode(pipes["float32"].processor, image, PROMPT)
    T = len(ids)
    ids_np, px = ids[None].numpy(), vision["pixel_values"].numpy()
    n = args.new_tokens
    hf = None if args.no_hf else load_model(model_dir)
    runs = {(s, p): ([], []) for s in pipes for p in ("never", f"layer:{k}")}
    hf_prefill, hf_decode = [], []
    visual = pipes["float32"].generate_ids(ids_np, px, max_new_tokens=1, policy="never").visual_tokens
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first round warms up
            for (s, p), (pre, dec) in runs.items():
                r = pipes[s].generate_ids(ids_np, px, max_new_tokens=n, policy=p)
                if rep:
                    pre.append(r.timings["prefill_s"])
                    dec.append(r.timings["decode_tokens_per_s"])
            if hf is not None:
                kw = dict(input_ids=ids[None], pixel_values=vision["pixel_values"],
                          attention_mask=torch.ones(1, T, dtype=torch.long), do_sample=False)
                t0 = time.perf_counter()
                hf.generate(**kw, max_new_tokens=1, min_new_tokens=1)
                one = time.perf_counter() - t0
                t0 = time.perf_counter()
                hf.generate(**kw, max_new_tokens=n, min_new_tokens=n)
                many = time.perf_counter() - t0
                if rep:
                    hf_prefill.append(one)
                    hf_decode.append((n - 1) / (many - one) if many > one else float("nan"))
    rss = {s: peak_rss(folders[s], ids_np, px, k, n, args.workdir) for s in SCHEMES}
    nbytes = {s: segment_bytes(folders[s]) for s in SCHEMES}
    t = pipes["float32"].manifest.text
    ratio_flops = flops.prefill_flops(t, T, visual, k) / flops.prefill_flops(t, T, visual, L)
    med = {key: (statistics.median(a), statistics.median(b)) for key, (a, b) in runs.items()}

    print(f"\nfused / quantized engines on CPU ({torch.get_num_threads()} threads), ONNX Runtime, d={t['hidden_size']}, "
          f"L={L}, {T} prompt tokens ({visual} visual), {n} new tokens, median of {args.reps}")
    print(f"{'scheme':<15}{'policy':<10}{'prefill ms':>11}{'decode tok/s':>14}{'segment MB':>12}{'peak RSS GB':>13}")
    for (s, p), (pre, dec) in med.items():
        seg = nbytes.get(s, nbytes["float32"]) / 1e6
        mem = rss.get(s)
        print(f"{s:<15}{p:<10}{pre * 1e3:>11.1f}{dec:>14.2f}{seg:>12.1f}{mem / 1e9 if mem else float('nan'):>13.2f}")
    if hf_decode:
        print(f"{'HF eager':<15}{'never':<10}{statistics.median(hf_prefill) * 1e3:>11.1f}"
              f"{statistics.median(hf_decode):>14.2f}")
    f32 = med[("float32", "never")]
    print()
    for s in ("int8", "int4"):
        q = med[(s, "never")]
        print(f"{s}: decode {q[1] / f32[1]:.2f}x float32, prefill {q[0] / f32[0]:.2f}x, segment bytes "
              f"{nbytes[s] / nbytes['float32']:.3f} of float32")
    plain = med[("float32 plain", "never")]
    print(f"float32 fused / plain graphs: decode {f32[1] / plain[1]:.2f}x, prefill {f32[0] / plain[0]:.2f}x")
    if hf_decode:
        print(f"float32 decode / HF eager decode: {f32[1] / statistics.median(hf_decode):.2f}x; "
              f"prefill {f32[0] / statistics.median(hf_prefill):.2f}x HF's time")
    for s in pipes:
        r = med[(s, f"layer:{k}")][0] / med[(s, "never")][0]
        print(f"{s}: layer:{k}/never prefill {r:.3f}, FLOPs ratio {ratio_flops:.3f} (x{r / ratio_flops:.3f})")
    evals = demo_eval(args.workdir, args.demo_samples) if args.demo_eval else None
    if evals:
        print("\ndemo accuracy (dyvte eval, held-out):")
        for s, acc in evals.items():
            print(f"  {s:<8} never {acc['never'] * 100:.1f}%  gate {acc['gate'] * 100:.1f}%")
    if args.json:
        args.json.write_text(json.dumps({
            "runs": {f"{s}|{p}": v for (s, p), v in runs.items()}, "hf_prefill_s": hf_prefill,
            "hf_decode_tps": hf_decode, "segment_bytes": nbytes, "peak_rss": rss, "flops_ratio": ratio_flops,
            "prompt_tokens": T, "visual_tokens": visual, "exit": k, "demo_eval": evals}, indent=2))


if __name__ == "__main__":
    main()
