#!/usr/bin/env python
"""Low-precision error at long positions, per backend, next to Hugging Face's own error.

    python scripts/precision_report.py                  # ~1 min on a 2-core CPU

Builds a small LLaVA with 4,096 positions and large random weights (init std 0.2, so attention
is far from uniform), exports it in float32, float16 and bfloat16, and feeds a prompt whose text
after the image starts ~1,800 tokens in. Prints max |logit error| of the last prompt token
against Hugging Face float32, for HF itself in fp16/bf16 and for each dyvte backend, and the
ratio to HF's error (tests/test_precision.py asserts <= 3x + a small epsilon).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=int, default=1800, help="text tokens before the image")
    ap.add_argument("--after", type=int, default=30, help="text tokens after the image")
    ap.add_argument("--init", type=float, default=0.2, help="std of the random weights")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dyvte.exporter import ExportSettings, export
    from dyvte.models import load_model
    from dyvte.runtime import Pipeline
    from dyvte.tiny import TinyLlavaSpec, build_tiny_llava

    root = args.workdir or Path(tempfile.mkdtemp(prefix="dyvte-precision-"))
    spec = TinyLlavaSpec(max_position_embeddings=4096, initializer_range=args.init)
    model_dir = build_tiny_llava(spec, root / "hf", seed=0)
    folders = {dt: export(ExportSettings(out=root / dt, model=str(model_dir), candidates=[1, 2, 3], dtype=dt,
                                         max_input_len=2048, max_new_tokens=64, progress=False, overwrite=True))
               for dt in ("float32", "float16", "bfloat16")}
    g = torch.Generator().manual_seed(0)
    vocab = len(spec.vocab)
    ids = torch.cat([torch.tensor([2]), torch.randint(5, vocab, (args.before,), generator=g),
                     torch.full((spec.num_visual_tokens,), 4), torch.randint(5, vocab, (args.after,), generator=g)])[None]
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)

    def hf_logits(dt):
        model = load_model(model_dir, dt)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels.to(model.dtype), attention_mask=torch.ones_like(ids))
        return out.logits[0, -1].float().numpy()

    ref = hf_logits("float32")
    hf_err = {dt: float(np.abs(hf_logits(dt) - ref).max()) for dt in ("float16", "bfloat16")}
    runs = [("torch (fp32 folder)", "float16", folders["float32"], "torch", {"device": "cpu", "dtype": "float16"}),
            ("onnxruntime (fp16 folder)", "float16", folders["float16"], "onnxruntime", {}),
            ("torch (fp32 folder)", "bfloat16", folders["float32"], "torch", {"device": "cpu", "dtype": "bfloat16"}),
            ("torch (bf16 folder)", "bfloat16", folders["bfloat16"], "torch", {"device": "cpu"}),
            ("onnxruntime (fp32 folder)", "float32", folders["float32"], "onnxruntime", {})]
    print(f"\n{time.strftime('%Y-%m-%d')}  prompt of {ids.shape[1]} tokens (text after the image from position "
          f"{args.before + 1 + spec.num_visual_tokens}), L={spec.num_layers}, d={spec.hidden_size}, init std {args.init}; "
          f"max |last-token logit error| vs HF float32 (max |logit| {np.abs(ref).max():.2f})")
    print(f"{'backend':<28}{'dtype':<10}{'error':>10}{'HF error':>10}{'ratio':>8}")
    for name, dt in (("HF", "float16"), ("HF", "bfloat16")):
        print(f"{name:<28}{dt:<10}{hf_err[dt]:>10.4f}{hf_err[dt]:>10.4f}{1.0:>8.2f}")
    rows = []
    for name, dt, folder, backend, kw in runs:
        with Pipeline.load(folder, backend=backend, **kw) as pipe:
            res = pipe.generate_ids(ids.numpy(), pixels.numpy(), max_new_tokens=1, policy="never", return_logits=True)
        err = float(np.abs(res.logits[0] - ref).max())
        base = hf_err.get(dt)
        rows.append({"backend": name, "dtype": dt, "error": err, "hf_error": base})
        print(f"{name:<28}{dt:<10}{err:>10.4f}{(base if base else float('nan')):>10.4f}"
              f"{(err / base if base else float('nan')):>8.2f}")
    return rows


if __name__ == "__main__":
    main()
