"""Command line: ``dyvte`` (run, inspect, export, ...) and ``dyvte-export``.

Each command parses its options and calls one library function. User errors
(:class:`~dyvte.errors.DyvteError`) print ``error: <message>`` and exit 1, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import DyvteError
from .settings import (
    DEFAULT_DTYPE,
    DEFAULT_GATE_THRESHOLD,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_NEW_TOKENS_RUN,
    DEFAULT_OPSET,
    DTYPES,
)


class _FriendlyErrors:
    """Mixin: turn DyvteError into a one-line message and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DyvteError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


class Group(_FriendlyErrors, click.Group):
    pass


class Command(_FriendlyErrors, click.Command):
    pass


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated layer numbers, e.g. 8,12,16") from None


def export_options(f):
    opts = [
        click.option("--model", "model", default=None,
                     help="HF LLaVA checkpoint: local folder, HF-cache repo id, or preset (llava-7b, llava-13b). "
                          "Default: the embedded demo model."),
        click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write."),
        click.option("--candidates", callback=_int_list, default=None,
                     help="Candidate exit layers, comma-separated (default: every L/8 layers, e.g. 4,8,...,28 for L=32)."),
        click.option("--gates", type=click.Path(path_type=Path), default=None,
                     help="Gates safetensors (gate.{k}.fc1/fc2.weight) enabling policy 'gate'."),
        click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset."),
        click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULT_DTYPE, show_default=True,
                     help="Precision of the exported graphs (RMSNorm/softmax stay float32)."),
        click.option("--max-batch", type=int, default=DEFAULT_MAX_BATCH, show_default=True),
        click.option("--max-input-len", type=int, default=None,
                     help="Longest prompt in tokens (default min(2048, positions - max-new-tokens))."),
        click.option("--max-new-tokens", type=int, default=None, help="Most generated tokens (default min(512, positions/4))."),
        click.option("--no-validate", is_flag=True, help="Skip checking each part against PyTorch."),
        click.option("--overwrite", is_flag=True, help="Replace an existing engine folder at --out."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _do_export(model, out, candidates, gates, opset, dtype, max_batch, max_input_len, max_new_tokens,
               no_validate, overwrite):
    from dyvte.exporter import ExportSettings, export

    path = export(ExportSettings(
        out=out, model=model, candidates=candidates, gates=gates, opset=opset, dtype=dtype, max_batch=max_batch,
        max_input_len=max_input_len, max_new_tokens=max_new_tokens, validate=not no_validate, overwrite=overwrite,
        progress=True, log=lambda msg: click.echo(msg, err=True),
    ))
    click.echo(f"engine folder ready: {path}")


@click.group(cls=Group)
@click.version_option(__version__, prog_name="dyvte")
def main():
    """dyvte: dynamic visual-token exit for LLaVA, exported to ONNX / TensorRT."""


@main.command("export", cls=Command)
@export_options
def export_cmd(**kwargs):
    """Export a LLaVA checkpoint to an engine folder (same as dyvte-export)."""
    _do_export(**kwargs)


@click.command("dyvte-export", cls=Command)
@export_options
@click.version_option(__version__, prog_name="dyvte-export")
def export_main(**kwargs):
    """Export a LLaVA checkpoint to an engine folder: ONNX vision, embeddings, decoder segments
    between candidate exit layers, gate and head, with a manifest."""
    _do_export(**kwargs)


def _fmt_timings(t: dict) -> str:
    return (f"prefill {t['prefill_s']:.3f} s ({t['prompt_tokens']} tokens), decode {t['decode_s']:.3f} s "
            f"({t['decode_tokens_per_s']:.1f} tokens/s)")


@main.command("run", cls=Command)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine folder from dyvte-export.")
@click.option("--image", required=True, help="Image file (PNG/JPEG).")
@click.option("--prompt", required=True, help="Question about the image (wrapped in the chat template).")
@click.option("--policy", default="auto", show_default=True,
              help="never | layer:K | gate | vtw | auto (gate when the folder has gates, else never).")
@click.option("--max-new-tokens", type=int, default=None,
              help=f"Most new tokens (default {DEFAULT_MAX_NEW_TOKENS_RUN}, or the folder's limit when smaller).")
@click.option("--backend", default="auto", show_default=True, help="auto | onnxruntime | torch | tensorrt")
@click.option("--gate-threshold", type=float, default=DEFAULT_GATE_THRESHOLD, show_default=True,
              help="Exit when p(exit) exceeds this.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-verify", is_flag=True, help="Skip the checksum check of the folder's files.")
def run_cmd(engine_dir, image, prompt, policy, max_new_tokens, backend, gate_threshold, temperature, top_p, seed,
            as_json, no_verify):
    """Answer a question about an image with an engine folder."""
    from dyvte.runtime import Pipeline

    with Pipeline.load(engine_dir, backend=backend, verify=not no_verify) as pipe:
        res = pipe.generate(image, prompt, max_new_tokens=max_new_tokens, policy=policy, gate_threshold=gate_threshold,
                            temperature=temperature, top_p=top_p, seed=seed)
        if as_json:
            click.echo(json.dumps({**res.to_dict(), "backend": pipe.backend, "num_layers": pipe.num_layers}))
            return
        click.echo(res.text)
        click.echo(f"exit layer {res.exit_layer}/{pipe.num_layers} (policy {res.policy}, backend {pipe.backend})", err=True)
        click.echo(_fmt_timings(res.timings), err=True)


@main.command("inspect", cls=Command)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the checksum check of the folder's files.")
def inspect_cmd(engine_dir, as_json, no_verify):
    """Summarise an engine folder (and check its files)."""
    from dyvte.engines.manifest import Manifest

    m = Manifest.load(engine_dir, verify=not no_verify)
    click.echo(json.dumps(m.data, indent=2) if as_json else m.summary())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
