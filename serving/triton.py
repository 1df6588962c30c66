"""``dyvte triton-repo``: a Triton Inference Server model repository serving an engine folder.

    REPO/<name>/config.pbtxt   python backend, dynamic batching, instance group, parameters
    REPO/<name>/1/model.py     the python-backend model (package data ``dyvte/serving/assets/model.py``)
    REPO/<name>/1/engine/      the engine folder itself, with ``copy_engine`` (else an absolute path)

The model takes PROMPT (BYTES [1]), an optional IMAGE (UINT8 [-1]: an encoded PNG/JPEG file), an
optional MAX_TOKENS (INT32 [1]) and an optional PRUNE (BYTES [1]: the request's prune spec,
``none`` for none; default: the repository's); it returns TEXT (BYTES [1]), EXIT_LAYER (INT32
[1]), TIMINGS (BYTES [1], JSON) and DYVTE (BYTES [1], JSON: gate probabilities, policy, prune
spec, finish reason, token counts, batch size).

**In-flight batching inside Triton.** Each model instance runs one serving worker
(:class:`dyvte.serving.worker.Worker`, the one ``dyvte serve`` uses) on a background thread of
the python backend's stub. ``execute`` only converts Triton's batch into jobs, hands them to the
worker and returns None at once; the worker answers each request through its response sender
(one response with the FINAL flag: the non-decoupled contract, so plain HTTP/gRPC ``infer``
clients work unchanged) when its rows finish. Because ``execute`` returns at once, Triton hands
the instance its next batch while earlier ones still decode, and those requests join the running
batch at the next decode step. Triton's dynamic batcher only decides which requests arrive
together (and are prefilled together). Requests cancelled by their client (Triton's
``is_cancelled``) leave the batch. :class:`TritonModel` holds this logic on numpy arrays, so it is
tested without Triton; ``model.py`` only converts tensors.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from dyvte.errors import DyvteError, EngineFolderError, InputError
from dyvte.settings import SERVE_PREFILL_TOKENS

KINDS = ("cpu", "gpu")

#: The python backend's stub (as shipped in nvidia-pytriton 0.7.0, Triton 2.51) reads numpy arrays
#: with numpy 1.x's C layout: under numpy 2.x it crashes on BYTES inputs or rejects outputs. The
#: environment the model runs in therefore takes dyvte's pinned dependencies with numpy 1.26
#: (every other pin accepts it); dyvte's own environment stays on numpy 2.
TRITON_ENV_NUMPY = "numpy==1.26.4"
PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver + python backend + stubs, runs on CPU (tests)
INPUTS = (  # name, Triton type, dims, extra fields
    ("PROMPT", "TYPE_STRING", "1", ""),
    ("IMAGE", "TYPE_UINT8", "-1", "allow_ragged_batch: true\n    optional: true"),
    ("MAX_TOKENS", "TYPE_INT32", "1", "optional: true"),
    ("PRUNE", "TYPE_STRING", "1", "optional: true"),
)
OUTPUTS = (("TEXT", "TYPE_STRING"), ("EXIT_LAYER", "TYPE_INT32"), ("TIMINGS", "TYPE_STRING"), ("DYVTE", "TYPE_STRING"))


@dataclass
class TritonRepoSettings:
    """Options of ``dyvte triton-repo`` (one field per flag)."""

    engine_dir: Path
    out: Path
    model_name: str = "dyvte"
    backend: str = "auto"
    kind: str = "cpu"  # instance_group kind: cpu (KIND_CPU) or gpu (KIND_GPU)
    instances: int = 1  # instances per device
    max_batch: int | None = None  # max_batch_size (requests per execute); default: the folder's limit
    max_queue_delay_us: int = 5000
    policy: str = "auto"
    gate_threshold: float = 0.5
    prune: str | None = None  # default prune spec (a request's PRUNE input overrides it)
    kv_budget: int | None = None  # KV cache bytes per instance (None: the folder's batch limit only)
    prefill_tokens: int | None = None  # prefill work per step (None: dyvte serve's default; 0: no bound)
    env: Path | None = None  # EXECUTION_ENV_PATH: the Python environment the model runs in
    copy_engine: bool = False
    overwrite: bool = False


def env_requirements(with_server: bool = True) -> list[str]:
    """Requirements of a python-backend environment (``scripts/setup.sh --triton``): dyvte's
    pinned dependencies with numpy 1.26, plus the nvidia-pytriton wheel's tritonserver."""
    from importlib.metadata import requires

    reqs = [r for r in requires("dyvte") or [] if "extra ==" not in r]
    reqs = [TRITON_ENV_NUMPY if r.replace(" ", "").startswith("numpy") else r for r in reqs]
    return reqs + ([PYTRITON] if with_server else [])


def _q(text) -> str:
    """A protobuf text-format string literal."""
    return json.dumps(str(text))


def config_pbtxt(name: str, max_batch: int, queue_delay_us: int, kind: str, instances: int, params: dict) -> str:
    """The model's ``config.pbtxt``."""
    inputs = ",\n".join(
        f"  {{\n    name: {_q(n)}\n    data_type: {t}\n    dims: [ {d} ]" + (f"\n    {extra}" if extra else "") + "\n  }"
        for n, t, d, extra in INPUTS)
    outputs = ",\n".join(f"  {{\n    name: {_q(n)}\n    data_type: {t}\n    dims: [ 1 ]\n  }}" for n, t in OUTPUTS)
    parameters = "\n".join(f"parameters: {{\n  key: {_q(k)}\n  value: {{ string_value: {_q(v)} }}\n}}"
                           for k, v in params.items())
    return (f"# written by dyvte triton-repo\nname: {_q(name)}\nbackend: \"python\"\nmax_batch_size: {max_batch}\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]\n{parameters}\n")


def write_triton_repo(s: TritonRepoSettings) -> Path:
    """Write (or replace, with ``overwrite``) ``s.out/s.model_name``; returns that folder."""
    from importlib.resources import files

    from dyvte.engines.manifest import Manifest
    from dyvte.runtime.policies import parse_policy

    manifest = Manifest.load(s.engine_dir, verify="exists")
    if s.policy == "auto":
        parse_policy("gate" if manifest.gate is not None else "never", manifest)
    else:
        parse_policy(s.policy, manifest)
    if s.kind not in KINDS:
        raise InputError(f"kind must be cpu or gpu, got {s.kind!r}")
    from dyvte import features

    instance_backend(s.backend, s.kind.upper(), 0, manifest.dtype,
                     tuple(features.built_engines(manifest)))  # refuses impossible combinations now
    limit = int(manifest.data["limits"]["max_batch"])
    max_batch = limit if s.max_batch is None else s.max_batch
    if not 1 <= max_batch <= limit:
        raise InputError(f"max batch must be in [1, {limit}] (the engine folder's limit), got {max_batch}")
    if s.instances < 1 or s.max_queue_delay_us < 0:
        raise InputError("instances must be >= 1 and the queue delay >= 0")
    if not 0 < s.gate_threshold < 1:
        raise InputError(f"gate threshold must be in (0, 1), got {s.gate_threshold}")
    from dyvte.runtime.plan import parse_prune

    try:
        prune = parse_prune(s.prune, manifest.num_layers, set(manifest.boundaries))
    except InputError as exc:
        raise InputError(f"--prune: {exc}") from None
    prefill_tokens = SERVE_PREFILL_TOKENS if s.prefill_tokens is None else s.prefill_tokens  # 0: no bound
    if prefill_tokens < 0 or (s.kv_budget is not None and s.kv_budget < 1):
        raise InputError("--prefill-tokens must be >= 0 (0: no bound) and --kv-budget a positive size")
    if not s.model_name or not all(c.isalnum() or c in "-_." for c in s.model_name):
        raise InputError(f"model name {s.model_name!r}: use letters, digits, '-', '_' and '.'")
    params = {"ENGINE_DIR": "engine" if s.copy_engine else str(Path(s.engine_dir).resolve()), "BACKEND": s.backend,
              "POLICY": s.policy, "GATE_THRESHOLD": str(s.gate_threshold), "PRUNE": str(prune) if prune else "none",
              "PREFILL_TOKENS": str(prefill_tokens)}
    if s.kv_budget is not None:
        params["KV_BUDGET"] = str(int(s.kv_budget))
    if s.env is not None:
        env = Path(s.env).resolve()
        if not (env / "bin" / "activate").is_file():
            raise InputError(f"--env {s.env} is not a Python environment (no bin/activate); make one with "
                             "python -m venv and install dyvte into it (see the README's Triton section)")
        params["EXECUTION_ENV_PATH"] = str(env)
    model_dir = Path(s.out) / s.model_name
    if model_dir.exists():
        if not s.overwrite:
            raise InputError(f"{model_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(s.model_name, max_batch, s.max_queue_delay_us, s.kind, s.instances, params))
    (model_dir / "1" / "model.py").write_text((files("dyvte.serving") / "assets" / "model.py").read_text())
    if s.copy_engine:
        shutil.copytree(s.engine_dir, model_dir / "1" / "engine")
    return model_dir


def instance_backend(backend: str, kind: str, device_id: int, dtype: str = "float32",
                     built: tuple = ()) -> tuple[str, dict]:
    """The Pipeline backend and its options for one Triton model instance (``kind`` CPU, GPU or
    MODEL): KIND_GPU instances run torch, or TensorRT when the folder has a finished build
    (``built``: :func:`dyvte.features.built_engines`), on their own ``cuda:N``; KIND_CPU
    instances ONNX Runtime (torch for bfloat16 folders) on the CPU."""
    from dyvte.runtime.backends import BACKENDS

    if backend not in ("auto", *BACKENDS):
        raise InputError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    if kind == "GPU":
        if backend == "onnxruntime":
            raise InputError("KIND_GPU instances run the torch or tensorrt backend (or auto); ONNX Runtime runs on CPU")
        if backend == "auto":
            from dyvte import features

            backend = "tensorrt" if "tensorrt" in built and features.has_tensorrt() else "torch"
        return backend, {"device": f"cuda:{device_id}"}
    if kind == "CPU":
        if backend == "tensorrt":
            raise InputError("the tensorrt backend needs a GPU; use --kind gpu, or onnxruntime/torch on CPU")
        if backend == "auto":
            backend = "torch" if dtype == "bfloat16" else "onnxruntime"
        return backend, ({"device": "cpu"} if backend == "torch" else {})
    return backend, {}



class _Answer:
    """Collects the rows of one Triton request and answers it once: its outputs when every row
    finished, or the first error (the other rows are then cancelled)."""

    def __init__(self, model: "TritonModel", n: int, respond):
        self.model, self.respond = model, respond
        self.outcomes, self.left, self.jobs = [None] * n, n, []
        self.failed = False
        self.lock = threading.Lock()

    def row(self, i: int):
        def done(outcome):
            with self.lock:
                if self.failed:
                    return
                if isinstance(outcome, Exception):
                    self.failed = True
                else:
                    self.outcomes[i] = outcome
                    self.left -= 1
                    if self.left:
                        return
            if isinstance(outcome, Exception):
                for job in self.jobs:
                    if not job.done:
                        self.model.worker.cancel(job, outcome)
                self.respond(outcome)
            else:
                self.respond(self.model._outputs(self.outcomes))

        return done


class TritonModel:
    """The python-backend model's work on numpy arrays: each Triton request (a dict of input
    arrays) is answered through a callback, from the worker thread, with a dict of output arrays
    or an exception (see module docstring)."""

    def __init__(self, pipe, policy: str = "auto", gate_threshold: float = 0.5, prune: str | None = None,
                 kv_budget: int | None = None, prefill_tokens: int | None = SERVE_PREFILL_TOKENS,
                 max_queue: int | None = None,
                 max_image_bytes: int | None = None, max_image_pixels: int | None = None):
        from dyvte import settings

        from .worker import Worker

        self.pipe = pipe
        self.plan = pipe.plan(policy, gate_threshold, prune)  # validates
        self.policy, self.gate_threshold = self.plan.policy.name, gate_threshold
        self.max_image_bytes = max_image_bytes or settings.MAX_IMAGE_BYTES
        self.max_image_pixels = max_image_pixels or settings.MAX_IMAGE_PIXELS
        self.worker = Worker(pipe, None, max_queue or settings.SERVE_MAX_QUEUE, kv_budget, prefill_tokens or None)

    @classmethod
    def from_triton_args(cls, args: dict) -> "TritonModel":
        """Load the engine folder named by the model config's parameters (``initialize``'s args)."""
        from dyvte.engines.manifest import Manifest
        from dyvte.runtime import Pipeline

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if not params.get("ENGINE_DIR"):
            raise EngineFolderError("the model config has no ENGINE_DIR parameter; write it with dyvte triton-repo")
        engine = Path(params["ENGINE_DIR"])
        if not engine.is_absolute():
            engine = Path(args["model_repository"]) / str(args["model_version"]) / engine
        kind = args.get("model_instance_kind", "CPU")
        from dyvte import features

        manifest = Manifest.load(engine, verify="exists")
        backend, options = instance_backend(params.get("BACKEND", "auto"), kind,
                                            int(args.get("model_instance_device_id", 0) or 0), manifest.dtype,
                                            tuple(features.built_engines(manifest)))
        pipe = Pipeline.load(engine, backend=backend, **options)
        max_batch = int(cfg.get("max_batch_size", 0))
        try:
            if max_batch > pipe.limits["max_batch"]:
                raise EngineFolderError(f"max_batch_size {max_batch} exceeds the engine folder's limit of "
                                        f"{pipe.limits['max_batch']}; rewrite the repository with --max-batch")
            kv = params.get("KV_BUDGET")
            prefill = params.get("PREFILL_TOKENS")
            return cls(pipe, params.get("POLICY", "auto"), float(params.get("GATE_THRESHOLD", 0.5)),
                       params.get("PRUNE") or None, int(kv) if kv else None,
                       int(prefill) if prefill else SERVE_PREFILL_TOKENS)
        except Exception:
            pipe.close()
            raise

    def _encode(self, inputs: dict) -> list:
        """Checked scheduler Sequences of one Triton request (its rows)."""
        import numpy as np

        from .server import decode_image
        from .worker import make_sequence

        prompts = inputs.get("PROMPT")
        if prompts is None or prompts.size == 0:
            raise InputError("PROMPT is required: the question as a UTF-8 string")
        prompts = prompts.reshape(len(prompts), -1)[:, 0]  # [b]
        images = inputs.get("IMAGE")
        if images is not None:
            images = np.asarray(images, dtype=np.uint8).reshape(len(prompts), -1)  # [b, n]
            if images.shape[1] > self.max_image_bytes:
                raise InputError(f"IMAGE has {images.shape[1]} bytes; this model takes at most {self.max_image_bytes}")
        tokens = inputs.get("MAX_TOKENS")
        tokens = None if tokens is None else np.asarray(tokens).reshape(len(prompts), -1)[:, 0]
        prunes = inputs.get("PRUNE")
        prunes = None if prunes is None else prunes.reshape(len(prompts), -1)[:, 0]
        out = []
        for r, p in enumerate(prompts):
            prompt = _text(p, "PROMPT")
            plan = self.plan
            if prunes is not None and _text(prunes[r], "PRUNE").strip():
                try:
                    plan = self.pipe.plan(self.policy, self.gate_threshold, _text(prunes[r], "PRUNE"))
                except InputError as exc:
                    raise InputError(f"PRUNE: {exc}") from None
            n_new = None if tokens is None else int(tokens[r])
            if images is not None and images.shape[1]:
                img = decode_image(images[r].tobytes(), self.max_image_pixels, "IMAGE")
                req = self.pipe.encode(img, prompt, n_new)
            else:
                req = self.pipe.encode_chat([{"role": "user", "content": prompt}], n_new)
            seq = make_sequence(self.pipe, req, plan)
            self.worker.check(seq)
            out.append(seq)
        return out

    def submit(self, requests: list) -> None:
        """Hand Triton's batch to the worker: ``requests`` is a list of (inputs dict, respond,
        is_cancelled or None); ``respond(outputs dict | exception)`` is called once per request
        (bad inputs now, the others from the worker thread when their rows finish). The good
        requests' rows are queued together, so they start in the same step."""
        from .worker import Job

        jobs = []
        for inputs, respond, is_cancelled in requests:
            try:
                seqs = self._encode(inputs)
            except DyvteError as exc:
                respond(exc)
                continue
            answer = _Answer(self, len(seqs), respond)
            answer.jobs = [Job(seq, answer.row(i), is_cancelled=is_cancelled) for i, seq in enumerate(seqs)]
            jobs += answer.jobs
        if not jobs:
            return
        try:
            self.worker.submit_many(jobs)
        except DyvteError as exc:  # queue full, shutting down: every request of this batch is refused
            for job in jobs:
                job.finish(exc)

    def execute(self, requests: list[dict], timeout: float | None = None) -> list:
        """Answer a list of requests (input dicts) and wait for them: one dict of output arrays,
        or an exception, per request."""
        answers, done = [None] * len(requests), [threading.Event() for _ in requests]

        def respond(i):
            def put(answer):
                answers[i] = answer
                done[i].set()

            return put

        self.submit([(inputs, respond(i), None) for i, inputs in enumerate(requests)])
        for event in done:
            event.wait(timeout)
        return answers

    def _outputs(self, outcomes: list) -> dict:
        import numpy as np

        def column(values, dtype=object):
            return np.array([[v] for v in values], dtype=dtype)  # [b, 1]

        L = self.pipe.manifest.num_layers
        results = [o.result for o in outcomes]
        info = [{"exit_layer": r.exit_layer, "num_layers": L, "policy": r.policy, "prune": r.prune,
                 "gate_probs": {str(k): float(v) for k, v in r.gate_probs.items()}, "finish_reason": r.finish_reason,
                 "prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids), "batch_size": o.batch_size,
                 "backend": self.pipe.backend} for r, o in zip(results, outcomes)]
        timings = [{**r.timings, "queue_s": o.queue_s} for r, o in zip(results, outcomes)]
        return {
            "TEXT": column([r.text.encode("utf-8") for r in results]),
            "EXIT_LAYER": column([r.exit_layer for r in results], np.int32),
            "TIMINGS": column([json.dumps(t).encode() for t in timings]),
            "DYVTE": column([json.dumps(d).encode() for d in info]),
        }

    def close(self, timeout: float | None = 60.0) -> None:
        """Finish the requests in flight (up to ``timeout`` s), then free the pipeline."""
        try:
            self.worker.close(timeout)
        finally:
            self.pipe.close()


def _text(value, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InputError(f"{name} must be UTF-8 text") from None
