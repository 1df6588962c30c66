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
from .runtime.plan import PRUNE_HELP
from .settings import (
    DEFAULT_DTYPE,
    DEFAULT_GATE_THRESHOLD,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_NEW_TOKENS_RUN,
    DEFAULT_OPSET,
    DTYPES,
    INT4_ACCURACY_LEVEL,
    INT4_BLOCK_SIZE,
    QUANTIZE_SCHEMES,
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
                     help="HF checkpoint (LLaVA-1.5, LLaVA-NeXT, InternVL3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3): local folder, "
                          "HF-cache repo id, or "
                          "preset (see README). Default: the embedded demo model."),
        click.option("--out", "out", default=None, type=click.Path(path_type=Path),
                     help="Engine folder to write (default: dyvte-engines/<model name>)."),
        click.option("--candidates", callback=_int_list, default=None,
                     help="Candidate exit layers, comma-separated (default: every L/8 layers, e.g. 4,8,...,28 for L=32)."),
        click.option("--prune-layers", callback=_int_list, default=None,
                     help="Extra segment boundaries where FastV stages (fastv:K:R) may act, comma-separated; "
                          "candidates are boundaries already. No gates or exits there."),
        click.option("--gates", type=click.Path(path_type=Path), default=None,
                     help="Gates safetensors (gate.{k}.fc1/fc2.weight) enabling policy 'gate'."),
        click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset."),
        click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULT_DTYPE, show_default=True,
                     help="Precision of the exported graphs (RMSNorm/softmax stay float32)."),
        click.option("--max-batch", type=int, default=DEFAULT_MAX_BATCH, show_default=True),
        click.option("--max-input-len", type=int, default=None,
                     help="Longest prompt in tokens (default min(2048, positions - max-new-tokens))."),
        click.option("--max-new-tokens", type=int, default=None, help="Most generated tokens (default min(512, positions/4))."),
        click.option("--max-tiles", type=int, default=None,
                     help="Most image tiles one prompt may carry (default: one image's maximum for tiled families, "
                          "as many images as fit max-input-len for LLaVA-1.5 and Qwen-VL, where a tile is an image)."),
        click.option("--max-pixels", type=int, default=None,
                     help="Qwen-VL: largest image in pixels the vision graph takes (default: the processor's "
                          "max_pixels, lowered so that one image fits max-input-len); the saved processor resizes "
                          "to it."),
        click.option("--quantize", type=click.Choice(QUANTIZE_SCHEMES), default=None,
                     help="Quantize the weights of the decoder segments and the head with ONNX Runtime's quantizer "
                          "(MatMulNBits: 8- or 4-bit symmetric blocks). Needs --dtype float32; runs on ONNX Runtime "
                          "only (TensorRT: dyvte build --quantize)."),
        click.option("--block-size", type=int, default=None,
                     help=f"--quantize: weights per block (power of two >= 16; default {INT4_BLOCK_SIZE})."),
        click.option("--accuracy-level", type=int, default=None,
                     help=f"--quantize: MatMulNBits compute type, 0-4 (4 = int8 on the CPU; default "
                          f"{INT4_ACCURACY_LEVEL})."),
        click.option("--fused/--no-fused", default=None,
                     help="Also write fused ONNX Runtime segment graphs (GroupQueryAttention, in-place KV cache) "
                          "sharing the plain graphs' weights (default: on, except for bfloat16)."),
        click.option("--no-validate", is_flag=True, help="Skip checking each part against PyTorch."),
        click.option("--overwrite", is_flag=True, help="Replace an existing engine folder at --out."),
        click.option("--engines", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
                     help="Also build TensorRT plans (needs TensorRT and a GPU; same as `dyvte build` afterwards)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _do_export(model, out, candidates, prune_layers, gates, opset, dtype, max_batch, max_input_len, max_new_tokens,
               max_tiles, max_pixels, quantize, block_size, accuracy_level, fused, no_validate, overwrite, engines):
    from dyvte.exporter import ExportSettings, export

    if engines == "tensorrt":
        if quantize:
            raise click.UsageError("--quantize makes ONNX Runtime graphs; for quantized TensorRT plans export a float "
                                   "folder and run `dyvte build --quantize int8|fp8|int4`")
        from dyvte.engines.tensorrt import import_tensorrt

        import_tensorrt()  # fail before exporting, not after
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if out is None:
        out = Path("dyvte-engines") / (Path(model.rstrip("/")).name.split("/")[-1] if model else "demo-llava")
    path = export(ExportSettings(
        out=out, model=model, candidates=candidates, prune_layers=prune_layers, gates=gates, opset=opset, dtype=dtype,
        max_batch=max_batch, max_input_len=max_input_len, max_new_tokens=max_new_tokens, max_tiles=max_tiles,
        max_pixels=max_pixels, quantize=quantize, block_size=block_size, accuracy_level=accuracy_level, fused=fused,
        validate=not no_validate, overwrite=overwrite, progress=True, log=log,
    ))
    if engines == "tensorrt":
        from dyvte.engines.tensorrt import BuildSettings, build_engines

        build_engines(BuildSettings(path, log=log))
    click.echo(f"engine folder ready: {path}")


@click.group(cls=Group)
@click.version_option(__version__, prog_name="dyvte")
def main():
    """dyvte: dynamic visual-token exit for vision-language models, exported to ONNX / TensorRT."""


@main.command("export", cls=Command)
@export_options
def export_cmd(**kwargs):
    """Export a VLM checkpoint to an engine folder (same as dyvte-export)."""
    _do_export(**kwargs)


@click.command("dyvte-export", cls=Command)
@export_options
@click.version_option(__version__, prog_name="dyvte-export")
def export_main(**kwargs):
    """Export a VLM checkpoint to an engine folder: ONNX vision, embeddings, decoder segments
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
@click.option("--prune", default=None, help=f"Visual-token pruning: {PRUNE_HELP}.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-verify", is_flag=True, help="Skip the checksum check of the folder's files.")
def run_cmd(engine_dir, image, prompt, policy, max_new_tokens, backend, gate_threshold, prune, temperature, top_p, seed,
            as_json, no_verify):
    """Answer a question about an image with an engine folder."""
    from dyvte.runtime import Pipeline

    with Pipeline.load(engine_dir, backend=backend, verify=not no_verify) as pipe:
        res = pipe.generate(image, prompt, max_new_tokens=max_new_tokens, policy=policy, gate_threshold=gate_threshold,
                            temperature=temperature, top_p=top_p, seed=seed, prune=prune)
        if as_json:
            click.echo(json.dumps({**res.to_dict(), "backend": pipe.backend, "num_layers": pipe.num_layers}))
            return
        click.echo(res.text)
        pruned = f", prune {res.prune}: tokens per segment {res.segment_tokens}" if res.prune else ""
        click.echo(f"exit layer {res.exit_layer}/{pipe.num_layers} (policy {res.policy}{pruned}, "
                   f"backend {pipe.backend})", err=True)
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


@main.command("lint", cls=Command)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--trt-version", type=click.Choice(["10", "11"]), default="10", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lint_cmd(engine_dir, trt_version, as_json):
    """Check every ONNX part against the TensorRT ONNX parser's operators, types and opsets (CPU only)."""
    from dyvte.engines.lint import lint_folder
    from dyvte.engines.manifest import Manifest

    report = lint_folder(Manifest.load(engine_dir, verify="exists"), trt_version)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    if not report.ok:
        sys.exit(1)


@main.command("build", cls=Command)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--max-batch", type=int, default=None, help="Largest batch (default: the folder's limit).")
@click.option("--max-input-len", type=int, default=None, help="Longest prompt (default: the folder's limit).")
@click.option("--max-new-tokens", type=int, default=None, help="Most generated tokens (default: the folder's limit).")
@click.option("--workspace-gib", type=float, default=None, help="TensorRT builder workspace limit.")
@click.option("--quantize", type=click.Choice(["int8", "fp8", "int4"]), default=None,
              help="Quantized plans of the segments and the head from NVIDIA ModelOpt's Q/DQ graphs "
                   "(int8/fp8 calibrated on --calibration-data, int4 weight-only); needs scripts/setup.sh --modelopt.")
@click.option("--modelopt-python", default=None, help="Python of ModelOpt's environment (default .venv/modelopt).")
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
              help="LLaVA-format JSON of calibration prompts (default: synthetic scenes).")
@click.option("--calibration-samples", type=int, default=16, show_default=True)
@click.option("--image-root", type=click.Path(path_type=Path), default=None)
def build_cmd(engine_dir, max_batch, max_input_len, max_new_tokens, workspace_gib, quantize, modelopt_python,
              calibration_data, calibration_samples, image_root):
    """Build TensorRT plans for an engine folder (resumable; needs TensorRT and an NVIDIA GPU)."""
    from dyvte.engines.tensorrt import BuildSettings, build_engines

    report = build_engines(BuildSettings(engine_dir, max_batch, max_input_len, max_new_tokens, workspace_gib,
                                         quantize, modelopt_python, calibration_data, calibration_samples, image_root,
                                         log=lambda m: click.echo(m, err=True)))
    click.echo(json.dumps(report, indent=2))


@main.command("profile", cls=Command)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="auto", show_default=True)
@click.option("--reps", type=int, default=10, show_default=True)
@click.option("--text-tokens", type=int, default=40, show_default=True, help="Text tokens after the image.")
@click.option("--decode-tokens", type=int, default=16, show_default=True)
@click.option("--policy", default=None, help="Compared with never (default: gate, else a middle candidate).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of per-part latency.")
@click.option("--polygraphy", "show_polygraphy", is_flag=True, help="Print the equivalent polygraphy commands.")
def profile_cmd(engine_dir, backend, reps, text_tokens, decode_tokens, policy, json_path, plot_path, show_polygraphy):
    """Per-part latency (vision, segments full/text/decode, gate, head) and end to end never vs DyVTE."""
    from dyvte.engines.files import write_json
    from dyvte.engines.profile import format_profile, plot_profile, profile

    if reps < 1 or text_tokens < 1 or decode_tokens < 2:
        raise click.BadParameter("--reps and --text-tokens must be >= 1, --decode-tokens >= 2")
    res = profile(engine_dir, backend, reps, text_tokens, decode_tokens, policy)
    click.echo(format_profile(res))
    if show_polygraphy:
        click.echo("\n" + "\n".join(res["polygraphy"]))
    if json_path:
        write_json(json_path, res)
    if plot_path:
        click.echo(f"wrote {plot_profile(res, plot_path)}", err=True)


@main.command("synth-data", cls=Command)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for data.json and images/.")
@click.option("--num", type=int, default=1000, show_default=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (demo: 0 train, 1 held-out, 2 calibration).")
def synth_cmd(out, num, seed):
    """Write a synthetic visual-QA set (LLaVA format) of shapes, colours, counts, positions and words."""
    from dyvte.synth import write_dataset

    if num < 1:
        raise click.BadParameter("--num must be at least 1")
    click.echo(write_dataset(out, num, seed))


@main.command("train-gates", cls=Command)
@click.option("--model", default=None, help="HF checkpoint (folder, repo id, preset); default: the demo model.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="LLaVA-format JSON (default: the demo's synthetic training split).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None, help="Folder image paths are relative to.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Gates safetensors to write.")
@click.option("--candidates", callback=_int_list, default=None, help="Layers to train gates for (default: every L/8).")
@click.option("--samples", type=int, default=None, help="Use at most this many samples.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=6e-5, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Samples per gate update.")
@click.option("--forward-batch", type=int, default=8, show_default=True, help="Samples per frozen-model forward.")
@click.option("--hidden", type=int, default=2048, show_default=True, help="Gate MLP width h.")
@click.option("--alpha", type=float, default=1.03, show_default=True, help="Exit CE must be < alpha x normal CE.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu | cuda (default: cuda when available).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Checkpoints (default <out>.work).")
def train_gates_cmd(model, data, image_root, out, candidates, samples, epochs, lr, batch_size, forward_batch, hidden,
                    alpha, seed, device, workdir):
    """Train DyVTE gates on a frozen VLM (labels: exit vs normal run, paper Eq. 5-7); resumable."""
    from dyvte.gate_training import GateTrainSettings, train_gates

    report = train_gates(GateTrainSettings(
        out=out, model=model, data=data, image_root=image_root, candidates=candidates, samples=samples, epochs=epochs,
        lr=lr, batch_size=batch_size, forward_batch=forward_batch, hidden=hidden, alpha=alpha, seed=seed,
        device=device, workdir=workdir, log=lambda m: click.echo(m, err=True)))
    click.echo(json.dumps({k: report[k] for k in ("samples", "positive_rate", "train_accuracy", "final_loss")}))


@main.command("calibrate-vtw", cls=Command)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="LLaVA-format JSON (default: the demo's calibration split).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None)
@click.option("--samples", type=int, default=20, show_default=True)
@click.option("--eta", type=float, default=0.003, show_default=True, help="KL threshold (VTW: 0.003 for LLaVA-1.5-7B).")
@click.option("--backend", default="auto", show_default=True)
def calibrate_vtw_cmd(engine_dir, data, image_root, samples, eta, backend):
    """Pick VTW's static exit layer (first candidate with mean first-token KL <= eta); enables policy vtw."""
    from dyvte.vtw import calibrate_vtw

    res = calibrate_vtw(engine_dir, data, image_root, samples, eta, backend)
    click.echo(f"vtw exit layer {res['exit_layer']} (eta {eta}, {res['samples']} samples); mean KL: "
               + ", ".join(f"{k}: {v:.2g}" for k, v in res["mean_kl"].items()))


@main.command("eval", cls=Command)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="LLaVA-format JSON (default: the demo model's held-out set).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None)
@click.option("--policies", default=None,
              help="Comma-separated (default: never, gate, vtw when available, layer:K for 0 and each candidate).")
@click.option("--max-samples", type=int, default=None, help="Evaluate at most this many samples (demo default 600).")
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--gate-threshold", type=float, default=DEFAULT_GATE_THRESHOLD, show_default=True)
@click.option("--prune", "prune", multiple=True,
              help=f"Prune spec applied to every listed policy ({PRUNE_HELP}; 'none' = no pruning); repeat for "
                   "several, each run is named policy+spec.")
@click.option("--frontier", is_flag=True,
              help="Accuracy vs decoder FLOPs of the default policies, FastV and DivPrune at several R and their "
                   "compositions with the gate (replaces --policies/--prune).")
@click.option("--backend", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write {run: metrics} here.")
@click.option("--plots", type=click.Path(path_type=Path), default=None, help="Write the PNG plots into this folder.")
def eval_cmd(engine_dir, data, image_root, policies, max_samples, max_new_tokens, gate_threshold, prune, frontier,
             backend, json_path, plots):
    """Accuracy, mean exit layer, TFLOPs and latency per exit policy (and prune spec), with plots."""
    from dyvte.engines.files import write_json
    from dyvte.engines.manifest import Manifest
    from dyvte.evaluate import evaluate, format_frontier, format_table, frontier_runs, plot

    m = Manifest.load(engine_dir, verify=False)
    pols = [p.strip() for p in policies.split(",") if p.strip()] if policies else None
    specs = [None if p.strip() in ("", "none") else p.strip() for p in prune] or [None]
    runs = frontier_runs(m) if frontier else None
    summary, rows = evaluate(engine_dir, data, image_root, pols, backend, max_samples, max_new_tokens, gate_threshold,
                             prune=specs, runs=runs)
    click.echo(format_table(summary, m.num_layers))
    if any(s["prune"] for s in summary.values()):
        click.echo("\n" + format_frontier(summary))
    if json_path:
        write_json(json_path, summary)
    if plots:
        for p in plot(summary, rows, m.num_layers, m.candidates, plots):
            click.echo(f"wrote {p}", err=True)


from . import settings as _settings  # noqa: E402  (serve defaults; dyvte.serving loads only when serving)


def _size(ctx, param, value):
    from dyvte.serving import parse_size

    try:
        return parse_size(value)
    except DyvteError as exc:
        raise click.BadParameter(str(exc)) from None


def _prefill_tokens(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter("must be >= 0 (0: no bound)")
    return value or None


@main.command("serve", cls=Command)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine folder from dyvte-export.")
@click.option("--backend", default="auto", show_default=True, help="auto | onnxruntime | torch | tensorrt")
@click.option("--host", default=_settings.SERVE_HOST, show_default=True,
              help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=_settings.SERVE_PORT, show_default=True)
@click.option("--policy", default="auto", show_default=True,
              help="Default exit policy (requests may pick another with {\"dyvte\": {\"policy\": ...}}).")
@click.option("--gate-threshold", type=float, default=DEFAULT_GATE_THRESHOLD, show_default=True)
@click.option("--prune", default=None,
              help="Default prune spec of requests (divprune:R, fastv:K:R, both comma-joined; requests may pick "
                   "another with {\"dyvte\": {\"prune\": ...}}).")
@click.option("--max-batch", type=int, default=None,
              help="Most requests decoding at once (default: the folder's limit).")
@click.option("--kv-budget", callback=_size, default=None,
              help="KV cache bytes running requests may reserve, e.g. 2GiB (default: no limit but --max-batch); "
                   "more requests wait.")
@click.option("--prefill-tokens", type=int, callback=_prefill_tokens, default=_settings.SERVE_PREFILL_TOKENS,
              show_default=True, help="Prefill work per decode step, in prompt tokens through the whole model "
                                      "(longer prompts are prefilled over several steps; 0: no bound).")
@click.option("--max-wait-ms", type=float, default=_settings.SERVE_MAX_WAIT_MS, show_default=True,
              help="When nothing runs, how long a first request waits for others being received (to prefill "
                   "them together).")
@click.option("--max-queue", type=int, default=_settings.SERVE_MAX_QUEUE, show_default=True,
              help="Most requests waiting for admission; more are answered 503 with Retry-After.")
@click.option("--request-timeout", type=float, default=_settings.SERVE_REQUEST_TIMEOUT_S, show_default=True,
              help="Seconds a request may take (queue + generation) before a 504.")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Allow local image paths / file:// URLs under this folder (off by default).")
@click.option("--max-image-bytes", type=int, default=_settings.MAX_IMAGE_BYTES, show_default=True,
              help="Per encoded image.")
@click.option("--max-image-pixels", type=int, default=_settings.MAX_IMAGE_PIXELS, show_default=True,
              help="Per image (width x height).")
@click.option("--max-body-bytes", type=int, default=_settings.SERVE_MAX_BODY_BYTES, show_default=True,
              help="Per request body (413 beyond).")
@click.option("--model-name", default=None, help="Model id clients send (default: the engine folder's name).")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime intra-op threads (--backend onnxruntime; default: one per core).")
@click.option("--no-verify", is_flag=True, help="Skip the checksum check of the folder's files.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_cmd(engine_dir, backend, host, port, policy, gate_threshold, prune, max_batch, kv_budget, prefill_tokens,
              max_wait_ms, max_queue, request_timeout, image_root, max_image_bytes, max_image_pixels, max_body_bytes,
              model_name, threads, no_verify, log_level):
    """OpenAI-compatible server (/v1/chat/completions, /v1/models, /health, /metrics) with in-flight batching."""
    from dyvte.serving.server import ServeSettings, serve

    serve(ServeSettings(
        engine_dir=engine_dir, backend=backend, host=host, port=port, policy=policy, gate_threshold=gate_threshold,
        prune=prune, max_batch=max_batch, kv_budget=kv_budget, prefill_tokens=prefill_tokens,
        max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout_s=request_timeout,
        image_root=image_root, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
        max_body_bytes=max_body_bytes, model_name=model_name, threads=threads, verify=not no_verify,
        log_level=log_level))


@main.command("triton-repo", cls=Command)
@click.option("--engine-dir", required=True, type=click.Path(path_type=Path), help="Engine folder from dyvte-export.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Triton model repository to write into.")
@click.option("--model-name", default="dyvte", show_default=True)
@click.option("--backend", default="auto", show_default=True,
              help="auto (GPU: tensorrt or torch; CPU: onnxruntime) | onnxruntime | torch | tensorrt")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="instance_group kind (KIND_CPU / KIND_GPU).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances per device.")
@click.option("--max-batch", type=int, default=None,
              help="max_batch_size: most requests Triton hands over at once (default: the folder's limit).")
@click.option("--max-queue-delay-us", type=int, default=5000, show_default=True,
              help="dynamic_batching max_queue_delay_microseconds.")
@click.option("--policy", default="auto", show_default=True, help="Exit policy of every request.")
@click.option("--gate-threshold", type=float, default=DEFAULT_GATE_THRESHOLD, show_default=True)
@click.option("--prune", default=None, help="Default prune spec (a request's PRUNE input overrides it).")
@click.option("--kv-budget", callback=_size, default=None,
              help="KV cache bytes per model instance, e.g. 2GiB (default: no limit but the folder's batch limit).")
@click.option("--prefill-tokens", type=int, callback=_prefill_tokens, default=_settings.SERVE_PREFILL_TOKENS,
              show_default=True, help="Prefill work per decode step, in prompt tokens through the whole model.")
@click.option("--env", "env", type=click.Path(path_type=Path), default=None,
              help="Python environment with dyvte for the python backend (EXECUTION_ENV_PATH).")
@click.option("--copy-engine", is_flag=True, help="Copy the engine folder into the repository (else an absolute path).")
@click.option("--overwrite", is_flag=True, help="Replace the model folder if it exists.")
def triton_repo_cmd(engine_dir, out, model_name, backend, kind, instances, max_batch, max_queue_delay_us, policy,
                    gate_threshold, prune, kv_budget, prefill_tokens, env, copy_engine, overwrite):
    """Write a Triton model repository (python backend over dyvte's in-flight batching worker)."""
    from dyvte.serving.triton import TritonRepoSettings, write_triton_repo

    path = write_triton_repo(TritonRepoSettings(
        engine_dir=engine_dir, out=out, model_name=model_name, backend=backend, kind=kind, instances=instances,
        max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, policy=policy, gate_threshold=gate_threshold,
        prune=prune, kv_budget=kv_budget, prefill_tokens=prefill_tokens or 0, env=env, copy_engine=copy_engine,
        overwrite=overwrite))
    click.echo(f"triton model written: {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
