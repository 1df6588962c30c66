"""``Pipeline``: load an engine folder and answer image questions with DyVTE exits.

    pipe = Pipeline.load("engines/demo", backend="onnxruntime")
    res = pipe.generate("cat.png", "What is in the image?", max_new_tokens=32, policy="gate")
    res.text, res.token_ids, res.exit_layer, res.timings

A ``Pipeline`` may be shared by threads on every backend: requests run through the runner one
batch at a time (a lock), so concurrent calls never see each other's state and answer as they
would alone. Calls that should share a batch are batched by the caller: :meth:`Pipeline.run`
with several :class:`Request` objects, or a step-level :meth:`Pipeline.scheduler` that requests
join and leave at every decode step (as ``dyvte serve`` and the Triton model do, see
:mod:`dyvte.serving`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dyvte.engines.manifest import Manifest
from dyvte.errors import InputError, MaxTokensError, PromptTooLongError
from dyvte.settings import DEFAULT_GATE_THRESHOLD, DEFAULT_MAX_NEW_TOKENS_RUN

from .plan import RowPlan
from .policies import Policy, parse_policy
from .sampling import SamplingParams


def torch_stack_numpy(rows: list):
    """Per-token logits [V] (torch) -> numpy [n, V]."""
    import torch

    return torch.stack(rows).numpy()


@dataclass
class Request:
    """One prompt to answer: token ids [T] int64 (torch), its images' pixel values (None without
    images; the shape is the family's, e.g. [N,3,H,W] for LLaVA-1.5), how many tokens to generate
    at most (None: the default), how to sample them, and the other tensors the family's processor
    returns for the images, under their HF names (``image_sizes``, ...). ``policy``,
    ``gate_threshold`` and ``prune`` (a prune spec), when set, override those of the call that runs it."""

    input_ids: object
    pixel_values: object = None
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    extra: dict = field(default_factory=dict)
    policy: str | None = None
    gate_threshold: float | None = None
    prune: str | None = None

    def vision_inputs(self) -> dict | None:
        if self.pixel_values is None:
            return None
        return {"pixel_values": self.pixel_values, **self.extra}


def _request(ids, vision: dict | None, max_new_tokens, sampling, prune=None) -> Request:
    vision = dict(vision or {})
    return Request(ids, vision.pop("pixel_values", None), max_new_tokens, sampling, vision, prune=prune)


@dataclass
class Result:
    """One answer. ``token_ids`` are the new tokens only (EOS included when generated);
    ``logits`` [n_new, V] float32 when requested; ``exit_layer`` = L means no exit."""

    text: str
    token_ids: list[int]
    exit_layer: int
    logits: object = None  # numpy [n_new, V] or None
    timings: dict = field(default_factory=dict)
    gate_probs: dict = field(default_factory=dict)  # candidate layer -> p(exit), gate policy only
    finish_reason: str = "length"  # "eos" | "length" | "stop" | "cancelled"
    prompt_tokens: int = 0
    policy: str = ""
    visual_tokens: int = 0  # of the prompt (the family's count for its images)
    image_tiles: int = 0  # tiles the vision part encoded (FLOPs; Qwen-VL: images)
    image_grids: list = field(default_factory=list)  # per image, its size facts for the vision FLOPs (Qwen-VL: t, h, w)
    prune: str | None = None  # the prune spec applied (None: no pruning)
    segment_tokens: list = field(default_factory=list)  # tokens present in each segment at prefill (FLOPs)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "exit_layer": self.exit_layer,
            "policy": self.policy,
            "gate_probs": {str(k): v for k, v in self.gate_probs.items()},
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "visual_tokens": self.visual_tokens,
            "prune": self.prune,
            "segment_tokens": self.segment_tokens,
            "timings": self.timings,
        }


class Pipeline:
    """An engine folder bound to one backend (see :mod:`dyvte.runtime.backends`)."""

    def __init__(self, manifest: Manifest, runner, processor=None):
        from .dispatch import Dispatcher

        from dyvte.families import family_named

        self.manifest, self.runner, self.processor = manifest, runner, processor
        self.family = family_named(manifest.model["family"])
        self.vision_meta = manifest.model["vision"]
        self.dispatcher = Dispatcher(runner, manifest)
        self._lock = threading.RLock()  # one batch at a time through the runner (its caches, contexts)
        self._encode_lock = threading.Lock()  # HF processors/tokenizers are not thread-safe

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", verify: bool = True, **backend_options) -> "Pipeline":
        """Open ``engine_dir`` (checking every file's checksum unless ``verify=False``)."""
        from dyvte.models import load_processor

        from .backends import create_runner

        manifest = Manifest.load(engine_dir, verify=verify)
        from dyvte.families import family_named

        processor = load_processor(manifest.path(manifest.data["processor"]), family_named(manifest.model["family"]))
        return cls(manifest, create_runner(backend, manifest, **backend_options), processor)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.dispatcher.runner.name

    @property
    def limits(self) -> dict:
        """Limits requests are checked against (the backend's: TensorRT plans may be built with
        other limits than the export's)."""
        return self.dispatcher.runner.limits

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def candidates(self) -> list[int]:
        return self.manifest.candidates

    def policy(self, name: str | None) -> Policy:
        """Parse a policy; ``None``/``"auto"`` = ``gate`` when the folder has gates, else ``never``."""
        if name in (None, "auto"):
            name = "gate" if self.manifest.gate is not None else "never"
        return parse_policy(name, self.manifest)

    # -- generation ----------------------------------------------------------------------------
    def encode(self, image, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, prune: str | None = None) -> Request:
        """A :class:`Request` for ``prompt`` about ``image`` (path or PIL image), in the folder's
        chat template (the processor is not thread-safe, so calls are serialised); ``prune``: the
        request's own prune spec (:mod:`dyvte.runtime.plan`)."""
        from .inputs import encode

        with self._encode_lock:
            ids, vision = encode(self.processor, image, prompt)
        return _request(ids, vision, max_new_tokens, SamplingParams(temperature, top_p, seed), prune)

    def encode_chat(self, messages: list, max_new_tokens: int | None = None, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, prune: str | None = None) -> Request:
        """A :class:`Request` for a chat (see :func:`dyvte.runtime.inputs.encode_messages`: roles,
        text and image parts, any number of images) in the folder's chat template."""
        from .inputs import encode_messages

        with self._encode_lock:
            ids, vision = encode_messages(self.processor, messages)
        return _request(ids, vision, max_new_tokens, SamplingParams(temperature, top_p, seed), prune)

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated token ids (special tokens skipped)."""
        if self.processor is None:
            return ""
        with self._encode_lock:
            return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate(self, image, prompt, max_new_tokens: int | None = None, policy: str | None = "auto",
                 gate_threshold: float = DEFAULT_GATE_THRESHOLD, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, return_logits: bool = False, prune: str | None = None):
        """Answer ``prompt`` about ``image`` (path or PIL image). Lists of both run as one batch
        and return a list of results; a single pair returns one :class:`Result`.

        ``max_new_tokens`` defaults to 64 (or the folder's limit when smaller); ``policy``
        ``"auto"`` is ``gate`` when the folder has gates, else ``never``; ``prune``: a prune spec
        (``divprune:R``, ``fastv:K:R``, both comma-joined; :mod:`dyvte.runtime.plan`).
        """
        single = not isinstance(prompt, (list, tuple))
        images, prompts = ([image], [prompt]) if single else (list(image), list(prompt))
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
        requests = [self.encode(img, p, max_new_tokens, temperature, top_p, seed) for img, p in zip(images, prompts)]
        results = self.run(requests, policy, gate_threshold, return_logits, prune=prune)
        return results[0] if single else results

    def generate_ids(self, input_ids, pixel_values=None, attention_mask=None,
                     max_new_tokens: int | None = None, policy: str | None = "auto",
                     gate_threshold: float = DEFAULT_GATE_THRESHOLD, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, return_logits: bool = False, prune: str | None = None,
                     **processor_outputs):
        """Generate from token ids [B,T] int64 and the images' pixel values (numpy or torch; the
        family's processor layout, e.g. [N,3,H,W] float32 for LLaVA-1.5, [patches, C*T*p*p] for
        Qwen-VL), plus the other tensors the family's processor returns under their HF names
        (``image_sizes`` for LLaVA-NeXT, ``image_grid_thw`` and ``mm_token_type_ids`` for Qwen-VL).

        ``attention_mask`` [B,T] marks real tokens when rows are padded. Returns one
        :class:`Result` for B = 1, else a list.
        """
        import numpy as np
        import torch

        ids = torch.as_tensor(np.asarray(input_ids))
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be an integer array [B,T], got shape {tuple(ids.shape)} {ids.dtype}")
        ids = ids.long()
        if attention_mask is not None:
            mask = torch.as_tensor(np.asarray(attention_mask)).bool()
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
            prompts = [row[m] for row, m in zip(ids, mask)]
        else:
            prompts = list(ids)
        refused = sorted(set(processor_outputs) & set(self.family.unsupported_inputs))
        if refused:
            raise InputError(f"{', '.join(refused)}: {self.family.unsupported_inputs[refused[0]]}")
        unknown = sorted(set(processor_outputs) - set(self.family.processor_inputs))
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not an input of {self.family.hf_class} (it takes "
                             f"{', '.join(self.family.processor_inputs)})")
        inputs = None
        if pixel_values is not None:
            inputs = {"pixel_values": pixel_values, **{k: v for k, v in processor_outputs.items() if v is not None}}
        image_id = self.manifest.model["image_token_id"]
        per_prompt = self.family.split(self.vision_meta, inputs, [int((p == image_id).sum()) for p in prompts])
        sampling = SamplingParams(temperature, top_p, seed)
        requests = [_request(p, v, max_new_tokens, sampling) for p, v in zip(prompts, per_prompt)]
        results = self.run(requests, policy, gate_threshold, return_logits, prune=prune)
        return results[0] if len(results) == 1 else results

    def check(self, r: Request, i: int = 0):
        """Validate one request against the runner's limits and the folder's model: returns its
        max_new_tokens and its checked images (:class:`dyvte.families.Vision` or None). Raises a
        one-line :class:`InputError` (:class:`PromptTooLongError`, :class:`MaxTokensError` for
        those limits)."""
        import torch

        m, lim = self.manifest, self.runner.limits
        image_id = m.model["image_token_id"]
        vocab = m.text["vocab_size"]
        p = r.input_ids
        n_new = r.max_new_tokens
        if n_new is None:  # default: 64, or the folder's limit when smaller
            n_new = min(DEFAULT_MAX_NEW_TOKENS_RUN, lim["max_new_tokens"])
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new <= lim["max_new_tokens"]:
            raise MaxTokensError(f"max_new_tokens must be in [1, {lim['max_new_tokens']}] (the limit of backend "
                                 f"{self.backend}; re-export or rebuild with --max-new-tokens for more), got {n_new}")
        if not isinstance(p, torch.Tensor) or p.ndim != 1 or len(p) == 0:
            raise InputError(f"prompt {i} is empty" if isinstance(p, torch.Tensor) and p.ndim == 1
                             else f"prompt {i}: input_ids must be a 1-D tensor of token ids")
        if len(p) > lim["max_input_len"]:
            raise PromptTooLongError(f"prompt {i} has {len(p)} tokens (images included); this engine folder takes at "
                                     f"most {lim['max_input_len']} with backend {self.backend} (shorten the prompt "
                                     "or re-export/rebuild with --max-input-len)")
        if len(p) + n_new > m.text["max_position_embeddings"]:
            raise PromptTooLongError(f"prompt {i} ({len(p)} tokens) + {n_new} new tokens exceeds the model's "
                                     f"{m.text['max_position_embeddings']} positions; shorten the prompt or lower "
                                     "max_new_tokens")
        other = p[p != image_id]
        if len(other) and (int(other.min()) < 0 or int(other.max()) >= vocab):
            raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        n_tok = int((p == image_id).sum())
        self.family.check_ids(self.vision_meta, p, i)
        vision = self.family.prepare(self.vision_meta, r.vision_inputs(), i)
        most = int(self.vision_meta["max_tiles"])
        if vision is not None and vision.num_tiles > most:
            raise InputError(f"prompt {i}: its images make {vision.num_tiles} tiles; this engine folder takes at "
                             f"most {most} per prompt (re-export with --max-tiles)")
        got = vision.tokens if vision is not None else 0
        if got != n_tok:
            what = (f"its {vision.images} image(s) give {got} visual tokens" if vision is not None
                    else "no images were given")
            raise InputError(f"prompt {i} holds {n_tok} image tokens but {what}; build prompt and images with "
                             "the folder's processor")
        return n_new, vision

    def plan(self, policy: str | None = "auto", gate_threshold: float = DEFAULT_GATE_THRESHOLD,
             prune=None) -> RowPlan:
        """A request's token plan: exit policy, gate threshold and prune spec, checked against the folder."""
        from .plan import parse_prune

        pol = self.policy(policy)
        if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float)) \
                or not 0.0 <= gate_threshold <= 1.0:  # NaN fails too
            raise InputError(f"gate_threshold must be in [0, 1] (exit when p(exit) exceeds it), got {gate_threshold}")
        spec = parse_prune(prune, self.num_layers, set(self.manifest.boundaries))
        return RowPlan(pol, float(gate_threshold), spec)

    def scheduler(self, max_batch: int | None = None, kv_budget: int | None = None,
                  prefill_tokens: int | None = None):
        """A step-level :class:`~dyvte.runtime.scheduler.Scheduler` over this pipeline's runner (in-flight
        batching; the caller drives it, holding :attr:`lock` around each step when threads share the pipeline).
        ``max_batch``: most rows at once (default and most: the runner's limit); ``kv_budget``: KV cache bytes
        admitted rows may reserve; ``prefill_tokens``: bound on prefill work per step (see the scheduler's
        module docstring)."""
        from .scheduler import Scheduler

        m, limit = self.manifest.model, self.runner.limits["max_batch"]
        max_batch = limit if max_batch is None else max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= limit:
            raise InputError(f"max_batch must be in [1, {limit}] (this engine folder's limit with backend "
                             f"{self.backend}), got {max_batch}")
        return Scheduler(self.dispatcher, m["eos_token_ids"], max_batch, m["image_token_id"], self.family,
                         self.vision_meta, kv_budget, prefill_tokens)

    def sequence(self, request: Request, plan: RowPlan, return_logits: bool = False, on_token=None, index: int = 0):
        """A checked :class:`~dyvte.runtime.scheduler.Sequence` for the scheduler (raises one-line
        :class:`InputError` for a bad request)."""
        from .scheduler import Sequence

        n_new, vision = self.check(request, index)
        if request.policy is not None or request.prune is not None or request.gate_threshold is not None:
            plan = self.plan(request.policy or plan.policy.name,
                             plan.threshold if request.gate_threshold is None else request.gate_threshold,
                             plan.prune if request.prune is None else request.prune)
        return Sequence(request.input_ids.long(), vision, plan, n_new, request.sampling, return_logits, on_token)

    @property
    def lock(self):
        """The lock serialising work on the runner (hold it around each scheduler step)."""
        return self._lock

    def run(self, requests: list[Request], policy: str | None = "auto", gate_threshold: float = DEFAULT_GATE_THRESHOLD,
            return_logits: bool = False, on_step=None, prune=None) -> list:
        """Answer several requests as one batch (each sample exits and prunes on its own, each
        request keeps its own token limit and sampling; a request's own ``policy``/``prune`` fields
        override the arguments); returns one :class:`Result` per request.

        ``on_step(step, tokens, active)`` is called after every generated token of the batch with
        each row's new token (list[int]) and which rows were still generating (list[bool]); it
        returns the rows to stop after this token (finish reason "stop"), or None. Rows that
        finish leave the batch at once. Thread-safe: concurrent calls run one after another.
        """
        plan = self.plan(policy, gate_threshold, prune)
        with self._lock:
            if self.runner is None:
                raise InputError("this Pipeline is closed; load the engine folder again")
            lim = self.runner.limits
            if not requests:
                raise InputError("no prompts given")
            if len(requests) > lim["max_batch"]:
                raise InputError(f"batch of {len(requests)} exceeds this engine folder's limit of {lim['max_batch']} "
                                 f"(backend {self.backend}); split the batch or re-export/rebuild with --max-batch")
            seqs = [self.sequence(r, plan, return_logits, index=i) for i, r in enumerate(requests)]
            sched = self.scheduler()
            for s in seqs:
                sched.add(s)
            step = 0
            try:
                while not sched.idle:
                    before = [len(s.tokens) for s in seqs]
                    sched.step()
                    if on_step is not None:
                        active = [len(s.tokens) > n for s, n in zip(seqs, before)]
                        toks = [s.tokens[-1] if a else 0 for s, a in zip(seqs, active)]
                        stop = set(on_step(step, toks, active) or ())
                        for i in stop:
                            if active[i] and seqs[i].finish in (None, "length"):
                                seqs[i].finish = "stop"
                                sched._finish_timings(seqs[i], time.perf_counter())
                    step += 1
            finally:
                sched.close()
            return [self.result(s) for s in seqs]

    def result(self, s) -> "Result":
        """The :class:`Result` of a finished :class:`~dyvte.runtime.scheduler.Sequence`."""
        v = s.vision
        logits = torch_stack_numpy(s.logits) if s.return_logits else None
        return Result(self.decode(s.tokens).strip(), list(s.tokens), s.exit_layer, logits, dict(s.timings),
                      s.gate_probs, s.finish, len(s.input_ids), s.plan.policy.name,
                      v.tokens if v else 0, v.num_tiles if v else 0, list(v.grids) if v else [],
                      str(s.plan.prune) if s.plan.prune else None, list(s.segment_tokens))

    def close(self) -> None:
        """Free the backend's sessions/engines (waits for a running request)."""
        with self._lock:
            if self.runner is not None:
                self.runner.close()
                self.runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
