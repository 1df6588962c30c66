#!/usr/bin/env python
"""Peak host memory of loading an engine folder with the torch backend, against the weights' size.

    python scripts/bench_load_memory.py --hidden 4096 --layers 8          # 7B-shaped layers, fp16

Builds a random LLaVA of the given shape (Llama decoder, small CLIP tower), exports it
(``--folder-dtype``, default float16), then, in fresh processes, builds its torch
runner (what ``Pipeline.load(dir, backend="torch", device=DEVICE, dtype=DTYPE)`` does besides
reading the manifest and the tokenizer) for each ``--dtypes`` and reports the peak resident
memory this added (the process's high-water RSS, ``VmHWM``, after it minus the resident size just
before it, imports done; ``ru_maxrss`` would count the parent's memory from before the exec) next to the size of the weights in the target dtype.
The torch backend builds its modules on the meta device and reads each weight from the ONNX
files straight into the target dtype and device, so the ratio should stay near 1 on CPU and near 0
host memory on CUDA. Use ``--folder DIR`` to measure an existing folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import torch, onnx
from transformers import AutoModel, LlavaConfig  # noqa: F401 - imports happen before the baseline
from transformers.models.clip import modeling_clip  # noqa: F401
from dyvte.engines.manifest import Manifest
from dyvte.exporter import hf, modules  # noqa: F401
from dyvte.runtime.backends import create_runner
from dyvte.runtime.backends import torch as tb  # noqa: F401

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def high_water():  # this process's peak RSS (ru_maxrss would include the parent's from before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

folder, device, dtype = sys.argv[1:4]
manifest = Manifest.load(folder, verify=False)
base = rss()
t = time.perf_counter()
r = create_runner("torch", manifest, device=device, dtype=dtype)
seconds = time.perf_counter() - t
peak = high_water()
mods = [*r.segments, r.embed_mod, r.head_mod, r.vision_mod] + ([r.gate_mod] if r.gate_mod is not None else [])
weights = sum(t.nbytes for m in mods for t in [*m.parameters(), *m.buffers()])
print(json.dumps({"baseline": base, "peak": peak, "weights": weights, "seconds": seconds, "rss_after": rss()}))
"""


def build_model(out: Path, hidden: int, layers: int, vocab: int, vision_layers: int) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from dyvte.tiny import TinyLlavaSpec, build_processor

    heads = max(1, hidden // 128)
    inter = 11008 if hidden == 4096 else int(hidden * 2.6875) // 64 * 64
    text = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096, bos_token_id=2,
                       eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, image_seq_length=576,
                      vision_feature_layer=-2)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build straight in fp16: half the host memory of fp32
    try:
        model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(out, safe_serialization=True)
    spec = TinyLlavaSpec(image_size=336, patch_size=14)
    proc = build_processor(spec)
    proc.tokenizer.add_tokens([f"w{i}" for i in range(max(0, vocab - len(proc.tokenizer)))])
    proc.save_pretrained(out)
    del model
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--folder-dtype", default="float16", help="dtype of the exported folder")
    ap.add_argument("--dtypes", default="float16", help="comma-separated dtypes to load it in")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("bench-load-memory"), help="where model and folder go")
    ap.add_argument("--folder", type=Path, default=None, help="measure this engine folder instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    folder = args.folder
    if folder is None:
        from dyvte.exporter import ExportSettings, export

        args.work.mkdir(parents=True, exist_ok=True)
        tag = f"d{args.hidden}-L{args.layers}-v{args.vocab}"
        model_dir = args.work / f"hf-{tag}"
        folder = args.work / f"engine-{tag}-{args.folder_dtype}"
        if not (model_dir / "config.json").is_file():
            t = time.perf_counter()
            build_model(model_dir, args.hidden, args.layers, args.vocab, args.vision_layers)
            print(f"built {model_dir} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if not (folder / "manifest.json").is_file():
            t = time.perf_counter()
            export(ExportSettings(out=folder, model=str(model_dir), candidates=list(range(2, args.layers, 2)), dtype=args.folder_dtype,
                                  max_input_len=1024, max_new_tokens=64, max_batch=1, overwrite=True))
            print(f"exported {folder} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), args.device, dtype], check=True,
                             capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(dtype=dtype, added=r["peak"] - r["baseline"], ratio=(r["peak"] - r["baseline"]) / r["weights"])
        rows.append(r)
    onnx_bytes = sum(p.stat().st_size for p in (Path(folder) / "onnx").iterdir())
    print(f"\n{time.strftime('%Y-%m-%d')}  torch backend load on {args.device}, folder {folder} "
          f"({Path(folder, 'manifest.json').is_file() and json.loads(Path(folder, 'manifest.json').read_text())['dtype']}, "
          f"{onnx_bytes / 2**30:.2f} GiB of ONNX)")
    print(f"{'dtype':<10}{'weights GiB':>12}{'peak added GiB':>16}{'ratio':>8}{'load s':>8}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['weights'] / 2**30:>12.2f}{r['added'] / 2**30:>16.2f}{r['ratio']:>8.2f}{r['seconds']:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
