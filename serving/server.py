"""``dyvte serve``: an OpenAI-compatible HTTP server over one engine folder, with in-flight batching.

    from dyvte.serving.server import ServeSettings, serve
    serve(ServeSettings("engines/demo", port=8000))        # blocks; SIGINT/SIGTERM drain and stop

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts, ``stream``, ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``; per request ``{"dyvte": {"policy",
"gate_threshold", "prune"}}``; a ``dyvte`` object with the exit layer, gate probabilities, policy
and timings in every answer), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus). This module only speaks HTTP: each request becomes a job of the serving loop
(:mod:`dyvte.serving.worker`), which joins it to the running batch at the next decode step.
Images come inline as ``data:`` URLs; local paths only under an operator-given root; URLs are
never fetched. Errors are OpenAI-style objects with a 4xx/5xx status and never stop the server.

:func:`create_app` builds the FastAPI app around a loaded :class:`~dyvte.runtime.Pipeline` (tests
and embedding); :func:`serve` loads the folder and runs it under uvicorn.
"""


import asyncio
import base64
import binascii
import io
import json
import logging
import math
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from dyvte import settings
from dyvte.errors import DyvteError, InputError, PolicyError
from dyvte.settings import DEFAULT_GATE_THRESHOLD

from .worker import (
    Job,
    Outcome,
    PromptTooLongError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    ServiceUnavailableError,
    Worker,
    make_sequence,
)

log = logging.getLogger("dyvte.serve")

#: Defaults of ``dyvte serve`` (flags of the same names).
DEFAULT_HOST = settings.SERVE_HOST
DEFAULT_PORT = settings.SERVE_PORT
DEFAULT_MAX_WAIT_MS = settings.SERVE_MAX_WAIT_MS
DEFAULT_MAX_QUEUE = settings.SERVE_MAX_QUEUE
DEFAULT_REQUEST_TIMEOUT_S = settings.SERVE_REQUEST_TIMEOUT_S
DEFAULT_MAX_IMAGE_BYTES = settings.MAX_IMAGE_BYTES
DEFAULT_MAX_IMAGE_PIXELS = settings.MAX_IMAGE_PIXELS
DEFAULT_MAX_BODY_BYTES = settings.SERVE_MAX_BODY_BYTES

DEFAULT_PREFILL_TOKENS = settings.SERVE_PREFILL_TOKENS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # dyvte -> OpenAI


@dataclass
class ServeSettings:
    """Options of ``dyvte serve`` (one field per flag)."""

    engine_dir: Path
    backend: str = "auto"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    policy: str = "auto"
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    prune: str | None = None  # default prune spec of requests (runtime/plan.py)
    max_batch: int | None = None  # most rows decoding at once; default: the folder's limit
    kv_budget: int | None = None  # KV cache bytes admitted rows may reserve (None: rows only)
    prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS  # prefill work per step (None: unbounded)
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    image_root: Path | None = None  # local image paths allowed only under this folder
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    model_name: str | None = None  # default: the engine folder's name
    threads: int | None = None  # ONNX Runtime intra-op threads (default: one per core)
    verify: bool = True
    log_level: str = "info"

    def check(self) -> None:
        for name in ("max_queue", "max_image_bytes", "max_image_pixels", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise InputError("max-wait-ms must be >= 0 and request-timeout > 0")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise InputError("--kv-budget must be a positive size such as 2GiB")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise InputError("--prefill-tokens must be at least 1")
        if self.threads is not None and (self.threads < 1 or self.backend != "onnxruntime"):
            raise InputError("--threads takes a positive number and applies to --backend onnxruntime")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise InputError(f"--image-root {self.image_root} is not a folder")


class APIError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RequestError(InputError):
    """A bad request field: answered 400 with OpenAI's ``param`` and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(message, param, code)


def api_error(exc: Exception, param: str | None = None) -> APIError:
    """The answer for an exception raised while handling a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, PolicyError):
        return APIError(400, str(exc), "invalid_request_error", "dyvte.policy", "invalid_policy")
    if isinstance(exc, InputError):
        return APIError(400, str(exc), "invalid_request_error", param)
    if isinstance(exc, ServiceUnavailableError):
        code = "queue_full" if isinstance(exc, QueueFullError) else "shutting_down"
        return APIError(503, str(exc), "server_error", None, code, {"Retry-After": "1"})
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error", None, "timeout")
    if isinstance(exc, RequestCancelledError):
        return APIError(499, str(exc), "cancelled", None, "cancelled")
    log.error("internal error: %r", exc)
    return APIError(500, f"internal server error ({type(exc).__name__}); the server keeps running", "server_error",
                    None, "internal_error")


# -- images ------------------------------------------------------------------------------------
def decode_image(data: bytes, max_pixels: int, where: str = "image"):
    """Encoded image bytes -> RGB PIL image; the pixel count is checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise bad_request(f"{where} is larger than {max_pixels} pixels", where, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad_request(f"{where} cannot be decoded: not an image file (send PNG, JPEG, GIF, BMP or WebP)",
                          where, "invalid_image") from None
    w, h = img.size
    if w * h > max_pixels:
        raise bad_request(f"{where} has {w}x{h} = {w * h} pixels; this server takes at most {max_pixels} per image",
                          where, "image_too_large")
    try:
        img.load()  # truncated or corrupt data fails here
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise bad_request(f"{where} is corrupt or truncated ({str(exc)[:120]})", where, "invalid_image") from None


def read_image_url(url, settings: ServeSettings, where: str = "image_url") -> bytes:
    """The encoded bytes an ``image_url`` names: a ``data:`` URL, or a local path / ``file://``
    URL under ``settings.image_root``. Network URLs are refused, never fetched."""
    if not isinstance(url, str) or not url.strip():
        raise bad_request(f"{where} must be a non-empty string (a data: URL)", where)
    url = url.strip()
    if url[:5].lower() == "data:":
        head, sep, payload = url[5:].partition(",")
        media = head.split(";")[0].strip().lower()
        if not sep or "base64" not in head.lower().split(";"):
            raise bad_request(f"{where}: data URLs must be base64-encoded (data:image/png;base64,...)", where,
                              "invalid_image_url")
        if media and not media.startswith("image/"):
            raise bad_request(f"{where}: a data URL of type {media!r} is not an image", where, "invalid_image_url")
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > settings.max_image_bytes + 2:
            raise bad_request(f"{where}: the image has about {len(payload) * 3 // 4} bytes; this server takes at most "
                              f"{settings.max_image_bytes}", where, "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64", where, "invalid_image_url") from None
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme and scheme != "file":
        raise bad_request(f"{where}: this server never fetches {scheme} URLs; send the image inline as a data: URL "
                          "(data:image/png;base64,...)", where, "image_url_not_allowed")
    root = settings.image_root
    if root is None:
        raise bad_request(f"{where}: local image paths are disabled on this server; send the image as a data: URL "
                          "(the operator can allow paths under a folder with --image-root DIR)", where,
                          "image_url_not_allowed")
    path = Path(unquote(url[7:]) if scheme == "file" else url)
    root = Path(root).resolve()
    full = (path if path.is_absolute() else root / path).resolve()
    if not full.is_relative_to(root):
        raise bad_request(f"{where}: {url} lies outside this server's image root", where, "image_url_not_allowed")
    if not full.is_file():
        raise bad_request(f"{where}: {url} not found under the image root", where, "invalid_image_url")
    if full.stat().st_size > settings.max_image_bytes:
        raise bad_request(f"{where}: {url} has {full.stat().st_size} bytes; this server takes at most "
                          f"{settings.max_image_bytes}", where, "image_too_large")
    return full.read_bytes()


# -- requests ----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat completion request: messages in :meth:`Pipeline.encode_chat`'s format
    (images decoded) and the generation options."""

    messages: list
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()
    policy: str | None = None
    gate_threshold: float | None = None
    prune: str | None = None  # None: the server's default; "none": no pruning


_UNSUPPORTED = {  # option -> (is it set to something dyvte cannot honour?, what to say)
    "n": (lambda v: v not in (None, 1), "only n=1 is supported; send separate requests for more answers"),
    "tools": (lambda v: bool(v), "tools / function calling are not supported by this model"),
    "functions": (lambda v: bool(v), "function calling is not supported by this model"),
    "tool_choice": (lambda v: v not in (None, "none"), "tools / function calling are not supported by this model"),
    "function_call": (lambda v: v not in (None, "none"), "function calling is not supported by this model"),
    "logprobs": (lambda v: bool(v), "logprobs are not supported"),
    "top_logprobs": (lambda v: v not in (None, 0), "logprobs are not supported"),
    "logit_bias": (lambda v: bool(v), "logit_bias is not supported"),
    "presence_penalty": (lambda v: v not in (None, 0), "presence_penalty is not supported (use 0)"),
    "frequency_penalty": (lambda v: v not in (None, 0), "frequency_penalty is not supported (use 0)"),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        "only text responses are supported (no JSON mode or schemas)"),
    "modalities": (lambda v: v not in (None, ["text"]), "only text output is supported"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported"),
}


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False, param: str | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v > hi or v < lo or (lo_open and v == lo):
        param = param or name
        raise bad_request(f"{param} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param)
    return float(v)


def parse_chat_request(body: dict, settings: ServeSettings, max_images: int | None = None) -> ChatRequest:
    """Validate an OpenAI chat completion request body and decode its images.

    Raises :class:`RequestError` (answered 400) naming the offending field. ``max_images``: refuse requests
    with more images than the prompt could hold, before decoding any.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, (unsupported, why) in _UNSUPPORTED.items():
        if unsupported(body.get(name)):
            raise bad_request(why, name, "unsupported_parameter")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad_request("stream must be true or false", "stream")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and opts.get("include_usage") in (None, True, False)):
        raise bad_request("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad_request(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise bad_request(f"seed must be a 64-bit integer, got {seed!r}", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("stop must be a non-empty string or a list of at most 4 of them", "stop")
    ext = body.get("dyvte") or {}
    if not isinstance(ext, dict) or set(ext) - {"policy", "gate_threshold", "prune"}:
        raise bad_request("dyvte must be an object with optional keys policy, gate_threshold and prune", "dyvte")
    if ext.get("policy") is not None and not isinstance(ext["policy"], str):
        raise bad_request("dyvte.policy must be a string such as 'gate', 'never' or 'layer:4'", "dyvte.policy")
    if ext.get("prune") is not None and not isinstance(ext["prune"], str):
        raise bad_request("dyvte.prune must be a string such as 'divprune:0.5', 'fastv:2:0.75' or 'none'",
                          "dyvte.prune", "invalid_prune")
    threshold = _number(ext, "gate_threshold", 0.0, 1.0, None, True, "dyvte.gate_threshold")
    return ChatRequest(
        messages=_convert_messages(body.get("messages"), settings, max_images),
        stream=bool(stream), include_usage=bool(opts and opts.get("include_usage")), max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0), top_p=_number(body, "top_p", 0.0, 1.0, 1.0, True),
        seed=seed, stop=tuple(stop), policy=ext.get("policy"), gate_threshold=threshold, prune=ext.get("prune"),
    )


def _convert_messages(messages, settings: ServeSettings, max_images: int | None) -> list:
    """OpenAI messages -> :meth:`Pipeline.encode_chat` messages (images decoded)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    n_images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    if max_images is not None and n_images > max_images:
        raise bad_request(f"the messages hold {n_images} images; the prompt fits at most {max_images}", "messages",
                          "context_length_exceeded")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{where}.role {m.get('role')!r} is not supported; use system, developer, user or "
                              "assistant (no tool messages)", f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request("tool calls are not supported by this model", f"{where}.tool_calls", "unsupported_parameter")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request(f"{where}.content must be a string or a non-empty list of text/image_url parts",
                              f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                data = read_image_url(url, settings, f"{pw}.image_url")
                parts.append({"type": "image", "image": decode_image(data, settings.max_image_pixels,
                                                                     f"{pw}.image_url")})
            else:
                raise bad_request(f"{pw} has type {kind!r}; this server takes text and image_url parts", pw)
        out.append({"role": role, "content": parts})
    return out


# -- metrics -----------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps can share a process)."""

    def __init__(self, num_layers: int, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("dyvte_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.errors = Counter("dyvte_request_errors", "Error answers by error code", ["code"], registry=r)
        self.latency = Histogram("dyvte_request_duration_seconds", "End-to-end latency of successful chat completions",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("dyvte_queue_wait_seconds", "Time from arrival to the start of the request's prefill",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("dyvte_time_to_first_token_seconds", "Streaming: arrival to first content",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dyvte_prompt_tokens", "Prompt tokens of answered requests (visual included)",
                                     registry=r)
        self.generated_tokens = Counter("dyvte_generated_tokens", "Tokens generated for answered requests", registry=r)
        self.exit_layer = Histogram("dyvte_exit_layer", f"Exit layer per answer ({num_layers} = no exit)", ["policy"],
                                    buckets=tuple(range(num_layers + 1)), registry=r)
        self.step_duration = Histogram("dyvte_step_duration_seconds", "Wall time of one scheduler step (decode + "
                                       "prefill)", buckets=STEP_BUCKETS, registry=r)
        self.step_tokens = Histogram("dyvte_step_tokens", "Tokens generated per scheduler step",
                                     buckets=tuple(range(0, max_batch + 1)), registry=r)
        self.queue_depth = Gauge("dyvte_queue_depth", "Requests waiting for admission", registry=r)
        self.in_flight = Gauge("dyvte_requests_in_flight", "Requests accepted and not answered yet", registry=r)
        self.rows = Gauge("dyvte_rows", "Rows by state after the last step (running: decoding; prefilling; "
                          "waiting: not admitted yet)", ["state"], registry=r)
        self.kv_bytes = Gauge("dyvte_kv_cache_bytes", "KV cache bytes: held by the caches (padding included), "
                              "reserved by admitted rows, and the budget (0: none)", ["kind"], registry=r)

    def bind(self, worker: Worker, kv_budget: int | None) -> None:
        """Gauges read the worker's state (its snapshot after the last step)."""
        self.queue_depth.set_function(lambda: worker.queue_depth)
        self.in_flight.set_function(lambda: worker.in_flight)
        for state in ("running", "prefilling", "waiting"):
            self.rows.labels(state).set_function(lambda k=state: worker.snapshot[k])
        self.kv_bytes.labels("held").set_function(lambda: worker.snapshot["kv_cache_bytes"])
        self.kv_bytes.labels("reserved").set_function(lambda: worker.snapshot["kv_reserved_bytes"])
        self.kv_bytes.labels("budget").set(kv_budget or 0)

    def stepped(self, stats, worker=None) -> None:
        self.step_duration.observe(stats.seconds)
        self.step_tokens.observe(stats.tokens)

    def answered(self, outcome: Outcome, started: float) -> None:
        res = outcome.result
        self.latency.observe(time.monotonic() - started)
        self.queue_wait.observe(outcome.queue_s)
        self.prompt_tokens.inc(res.prompt_tokens)
        self.generated_tokens.inc(len(res.token_ids))
        self.exit_layer.labels(res.policy).observe(res.exit_layer)

    def failed(self, err: APIError) -> None:
        self.errors.labels(err.code or err.type).inc()


# -- the app -----------------------------------------------------------------------------------
class ServerState:
    """Everything the endpoints share: pipeline, worker, metrics, settings."""

    def __init__(self, pipe, settings: ServeSettings):
        settings.check()
        self.pipe, self.settings = pipe, settings
        self.model_name = settings.model_name or Path(pipe.manifest.root).resolve().name
        self.default_policy = pipe.policy(settings.policy).name  # validates
        if not 0 < settings.gate_threshold < 1:
            raise InputError(f"gate threshold must be in (0, 1), got {settings.gate_threshold}")
        try:
            self.default_plan = pipe.plan(self.default_policy, settings.gate_threshold, settings.prune)
        except PolicyError:
            raise
        except InputError as exc:
            raise InputError(f"--prune: {exc}") from None
        self.num_layers = pipe.manifest.num_layers
        limits = pipe.limits
        model = pipe.manifest.model
        per_image = model["vision"]["tokens_per_tile"]
        self.max_images = limits["max_input_len"] // per_image if per_image else None  # before decoding any
        max_batch = limits["max_batch"] if settings.max_batch is None else settings.max_batch
        if not 1 <= max_batch <= limits["max_batch"]:  # here, not at server start-up: one line, exit 1
            raise InputError(f"--max-batch must be in [1, {limits['max_batch']}] (this engine folder's limit with "
                             f"backend {pipe.backend}), got {max_batch}")
        self.metrics = Metrics(self.num_layers, max_batch)
        self.worker: Worker | None = None
        self._max_batch = max_batch
        self.draining = False
        self.created = int(time.time())

    def start(self) -> None:
        if self.worker is None:
            s = self.settings
            self.worker = Worker(self.pipe, self._max_batch, s.max_queue, s.kv_budget, s.prefill_tokens,
                                 s.max_wait_ms / 1000.0, on_step=self.metrics.stepped)
            self.metrics.bind(self.worker, s.kv_budget)

    def stop(self) -> None:
        """Finish every accepted request, then stop the worker."""
        self.draining = True
        if self.worker is not None:
            self.worker.close(timeout=self.settings.request_timeout_s + 5)

    # -- request handling (prepare runs in a worker thread: JSON, images, tokenizer) ------------
    def plan(self, chat: ChatRequest):
        """The request's token plan: its own policy, threshold and prune spec, else the server's."""
        s = self.settings
        policy = chat.policy if chat.policy is not None else self.default_policy
        threshold = chat.gate_threshold if chat.gate_threshold is not None else s.gate_threshold
        prune = chat.prune if chat.prune is not None else self.default_plan.prune
        try:
            return self.pipe.plan(policy, threshold, prune)
        except PolicyError:
            raise
        except InputError as exc:
            param = "dyvte.prune" if chat.prune is not None else "dyvte.gate_threshold"
            raise bad_request(str(exc), param, "invalid_prune" if chat.prune is not None else None) from None

    def prepare(self, raw: bytes):
        """Request body -> (ChatRequest, checked Sequence). Raises :class:`APIError` or
        :class:`~dyvte.errors.DyvteError` (see :func:`api_error`)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON ({str(exc)[:100]})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", "invalid_request_error", "model", "model_not_found")
        from dyvte.runtime.scheduler import KVBudgetError

        chat = parse_chat_request(body, self.settings, self.max_images)
        plan = self.plan(chat)
        try:
            req = self.pipe.encode_chat(chat.messages, chat.max_tokens, chat.temperature, chat.top_p, chat.seed)
            seq = make_sequence(self.pipe, req, plan)
            self.worker.check(seq)
        except (RequestError, PromptTooLongError):
            raise
        except KVBudgetError as exc:
            raise bad_request(str(exc), "max_tokens", "kv_budget_exceeded") from None
        except InputError as exc:  # the pipeline's own message; name the field it concerns
            raise bad_request(str(exc), "max_tokens" if "max_tokens" in str(exc) else "messages") from None
        return chat, seq

    def error_response(self, err: APIError):
        from fastapi.responses import JSONResponse

        self.metrics.requests.labels(str(err.status)).inc()
        self.metrics.failed(err)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def dyvte_info(self, outcome: Outcome, started: float) -> dict:
        res = outcome.result
        t = res.timings
        return {
            "exit_layer": res.exit_layer,
            "num_layers": self.num_layers,
            "gate_probs": {str(k): float(v) for k, v in res.gate_probs.items()},
            "policy": res.policy,
            "prune": res.prune,
            "backend": self.pipe.backend,
            "batch_size": outcome.batch_size,
            "finish_reason": outcome.finish_reason,
            "timings": {
                "queue_s": round(outcome.queue_s, 6),
                "prefill_s": round(t.get("prefill_s", 0.0), 6),  # the batch's
                "decode_s": round(t.get("decode_s", 0.0), 6),
                "batch_s": round(outcome.run_s, 6),
                "request_s": round(time.monotonic() - started, 6),
            },
        }

    def usage(self, outcome: Outcome) -> dict:
        res = outcome.result
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids)}

    def _job(self, seq, chat: ChatRequest, on_done, on_delta=None) -> Job:
        deadline = time.monotonic() + self.settings.request_timeout_s
        return Job(seq, on_done, chat.stop, on_delta, deadline)

    async def complete(self, chat, seq, started: float, arrival=None):
        from fastapi.responses import JSONResponse

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = self._job(seq, chat, lambda o: _threadsafe(loop, _settle, fut, o))
        try:
            self.worker.submit(job, arrival)
        except ServiceUnavailableError as exc:
            return self.error_response(api_error(exc))
        left = max(0.0, job.deadline - time.monotonic())
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), left)
        except asyncio.TimeoutError:
            outcome = RequestTimeoutError(f"the request did not finish within {self.settings.request_timeout_s:g} s")
            self.worker.cancel(job, outcome)
        except asyncio.CancelledError:  # the client went away
            self.worker.cancel(job, RequestCancelledError("client disconnected"))
            raise
        if isinstance(outcome, Exception):
            return self.error_response(api_error(outcome))
        self.metrics.requests.labels("200").inc()
        self.metrics.answered(outcome, started)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                         "logprobs": None, "finish_reason": FINISH_REASONS[outcome.finish_reason]}],
            "usage": self.usage(outcome),
            "dyvte": self.dyvte_info(outcome, started),
        }
        return JSONResponse(body)

    async def stream(self, chat, seq, started: float, arrival=None):
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = self._job(seq, chat,
                        on_done=lambda o: _threadsafe(loop, queue.put_nowait, ("done", o)),
                        on_delta=lambda d: _threadsafe(loop, queue.put_nowait, ("delta", d)))
        try:
            self.worker.submit(job, arrival)
        except ServiceUnavailableError as exc:
            return self.error_response(api_error(exc))
        self.metrics.requests.labels("200").inc()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        def failure(exc: Exception) -> str:
            err = api_error(exc)
            self.metrics.failed(err)
            return f"data: {json.dumps(err.body())}\n\n"

        async def events():
            first = True
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), max(0.0, job.deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        err = RequestTimeoutError(f"the request did not finish within "
                                                  f"{self.settings.request_timeout_s:g} s")
                        self.worker.cancel(job, err)
                        yield failure(err)
                        return
                    if kind == "delta":
                        if first:
                            self.metrics.first_token.observe(time.monotonic() - started)
                            first = False
                        yield chunk({"content": value})
                        continue
                    if isinstance(value, Exception):
                        yield failure(value)
                        return
                    self.metrics.answered(value, started)
                    yield chunk({}, FINISH_REASONS[value.finish_reason], dyvte=self.dyvte_info(value, started))
                    if chat.include_usage:
                        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "choices": [], "usage": self.usage(value)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not job.done:
                    self.worker.cancel(job, RequestCancelledError("client disconnected"))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _settle(fut, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _threadsafe(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


async def _read_body(request, limit: int) -> bytes:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body has {size} bytes; this server takes at most {limit}",
                       "invalid_request_error", None, "request_too_large")
    chunks, n = [], 0
    async for part in request.stream():
        n += len(part)
        if n > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes", "invalid_request_error", None,
                           "request_too_large")
        chunks.append(part)
    return b"".join(chunks)


def create_app(pipe, settings: ServeSettings):
    """The FastAPI app serving ``pipe`` (the worker starts and drains with the app's lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    state = ServerState(pipe, settings)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="dyvte", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dyvte = state

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None,
                       "not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return state.error_response(api_error(exc))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.monotonic()
        with state.worker.arriving() as arrival:
            try:
                raw = await _read_body(request, settings.max_body_bytes)
                chat, seq = await run_in_threadpool(state.prepare, raw)
            except (APIError, DyvteError) as exc:
                return state.error_response(api_error(exc))
            answer = state.stream if chat.stream else state.complete
            return await answer(chat, seq, started, arrival)

    def model_card() -> dict:
        m = pipe.manifest
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dyvte",
                "dyvte": {"source": m.data["model"].get("source"), "num_layers": m.num_layers,
                          "candidates": m.candidates, "backend": pipe.backend, "policy": state.default_policy,
                          "limits": dict(pipe.limits)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            err = APIError(404, f"the model {model_id!r} does not exist; this server serves {state.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")
            return JSONResponse(err.body(), status_code=404)
        return model_card()

    @app.get("/health")
    async def health():
        w = state.worker
        body = {"status": "draining" if state.draining else "ok", "model": state.model_name,
                "backend": pipe.backend, "queue_depth": w.queue_depth if w else 0, "in_flight": w.in_flight if w else 0,
                "rows": {k: w.snapshot[k] for k in ("running", "prefilling", "waiting")} if w else {}}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: ServeSettings) -> None:
    """Load the engine folder and serve it until SIGINT/SIGTERM; then stop accepting
    connections, finish the requests in flight and exit."""
    import uvicorn

    from dyvte.runtime import Pipeline

    settings.check()
    options = {"threads": settings.threads} if settings.threads else {}
    pipe = Pipeline.load(settings.engine_dir, backend=settings.backend, verify=settings.verify, **options)
    if pipe.backend == "onnxruntime":
        # torch only does the dispatcher's small tensor work here; its thread pool would compete
        # with ONNX Runtime's for the same cores (2.2-2.5x slower batches measured on 2 cores)
        import torch

        torch.set_num_threads(1)
    try:
        app = create_app(pipe, settings)
        state: ServerState = app.state.dyvte

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                state.draining = True  # /health answers 503 so load balancers stop sending
                super().handle_exit(sig, frame)

        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
        logging.getLogger("uvicorn.error").info(  # uvicorn's configured logger: shown with its own lines
            "dyvte: model %r (%s), backend %s, policy %s, prune %s, max batch %d, KV budget %s, prefill tokens "
            "per step %s", state.model_name, settings.engine_dir, pipe.backend, state.default_policy,
            state.default_plan.prune or "none", state._max_batch,
            f"{settings.kv_budget / 2**20:.0f} MiB" if settings.kv_budget else "none",
            settings.prefill_tokens or "unbounded")
        # uvicorn re-raises SIGINT/SIGTERM once its graceful shutdown is done; exit 0 then
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, _exit_after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            Server(config).run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        pipe.close()


def _exit_after_shutdown(signum, frame):
    raise SystemExit(0)
