"""``Pipeline``: load an engine folder and answer image questions with DyVTE exits.

    pipe = Pipeline.load("engines/demo", backend="onnxruntime")
    res = pipe.generate("cat.png", "What is in the image?", max_new_tokens=32, policy="gate")
    res.text, res.token_ids, res.exit_layer, res.timings
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dyvte.engines.manifest import Manifest
from dyvte.errors import InputError
from dyvte.settings import DEFAULT_GATE_THRESHOLD, DEFAULT_MAX_NEW_TOKENS_RUN

from .policies import Policy, parse_policy


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
    finish_reason: str = "length"  # "eos" | "length"
    prompt_tokens: int = 0
    policy: str = ""

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "exit_layer": self.exit_layer,
            "policy": self.policy,
            "gate_probs": {str(k): v for k, v in self.gate_probs.items()},
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "timings": self.timings,
        }


class Pipeline:
    """An engine folder bound to one backend (see :mod:`dyvte.runtime.backends`)."""

    def __init__(self, manifest: Manifest, runner, processor=None):
        from .dispatch import Dispatcher

        self.manifest, self.runner, self.processor = manifest, runner, processor
        self.dispatcher = Dispatcher(runner, manifest)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", verify: bool = True, **backend_options) -> "Pipeline":
        """Open ``engine_dir`` (checking every file's checksum unless ``verify=False``)."""
        from dyvte.models import load_processor

        from .backends import create_runner

        manifest = Manifest.load(engine_dir, verify=verify)
        processor = load_processor(manifest.path(manifest.data["processor"]))
        return cls(manifest, create_runner(backend, manifest, **backend_options), processor)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.runner.name

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
    def generate(self, image, prompt, max_new_tokens: int | None = None, policy: str | None = "auto",
                 gate_threshold: float = DEFAULT_GATE_THRESHOLD, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, return_logits: bool = False):
        """Answer ``prompt`` about ``image`` (path or PIL image). Lists of both run as one batch
        and return a list of results; a single pair returns one :class:`Result`.

        ``max_new_tokens`` defaults to 64 (or the folder's limit when smaller); ``policy``
        ``"auto"`` is ``gate`` when the folder has gates, else ``never``.
        """
        from .inputs import encode

        single = not isinstance(prompt, (list, tuple))
        images, prompts = ([image], [prompt]) if single else (list(image), list(prompt))
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images for {len(prompts)} prompts; pass one image per prompt")
        encoded = [encode(self.processor, img, p) for img, p in zip(images, prompts)]
        import torch

        ids = [e[0] for e in encoded]
        pixels = torch.cat([e[1] for e in encoded])
        results = self._run(ids, pixels, max_new_tokens, policy, gate_threshold, temperature, top_p, seed, return_logits)
        return results[0] if single else results

    def generate_ids(self, input_ids, pixel_values=None, attention_mask=None,
                     max_new_tokens: int | None = None, policy: str | None = "auto",
                     gate_threshold: float = DEFAULT_GATE_THRESHOLD, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, return_logits: bool = False):
        """Generate from token ids [B,T] int64 and pixel values [N,3,H,W] float32 (numpy or torch).

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
        pixels = None
        if pixel_values is not None:
            pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32))
        results = self._run(prompts, pixels, max_new_tokens, policy, gate_threshold, temperature, top_p, seed, return_logits)
        return results[0] if len(results) == 1 else results

    def _check(self, prompts, pixels, max_new_tokens):
        m, lim = self.manifest, self.manifest.limits
        n_vis, image_id = m.model["num_visual_tokens"], m.model["image_token_id"]
        vocab = m.text["vocab_size"]
        if not prompts:
            raise InputError("no prompts given")
        if len(prompts) > lim["max_batch"]:
            raise InputError(f"batch of {len(prompts)} exceeds this engine folder's limit of {lim['max_batch']}; "
                             "split the batch or re-export with --max-batch")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= lim["max_new_tokens"]:
            raise InputError(f"max_new_tokens must be in [1, {lim['max_new_tokens']}] (the exported limit; "
                             f"re-export with --max-new-tokens for more), got {max_new_tokens}")
        n_images = 0
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            if len(p) > lim["max_input_len"]:
                raise InputError(f"prompt {i} has {len(p)} tokens; this engine folder takes at most "
                                 f"{lim['max_input_len']} (shorten the prompt or re-export with --max-input-len)")
            if len(p) + max_new_tokens > m.text["max_position_embeddings"]:
                raise InputError(f"prompt {i} ({len(p)} tokens) + {max_new_tokens} new tokens exceeds the model's "
                                 f"{m.text['max_position_embeddings']} positions; shorten the prompt or lower max_new_tokens")
            n_img_tok = int((p == image_id).sum())
            if n_img_tok % n_vis:
                raise InputError(f"prompt {i} has {n_img_tok} image tokens, not a multiple of the model's {n_vis} "
                                 "visual tokens per image; build prompts with the folder's processor")
            other = p[p != image_id]
            if len(other) and (int(other.min()) < 0 or int(other.max()) >= vocab):
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
            n_images += n_img_tok // n_vis
        shape = tuple(m.model["image_shape"])
        if n_images == 0 and pixels is not None and len(pixels):
            raise InputError(f"got {len(pixels)} images but the prompts hold no image tokens")
        if n_images:
            if pixels is None or pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape or len(pixels) != n_images:
                got = "none" if pixels is None else tuple(pixels.shape)
                raise InputError(f"the prompts need pixel_values of shape [{n_images}, {', '.join(map(str, shape))}], "
                                 f"got {got}; preprocess images with the folder's processor")

    def _run(self, prompts, pixels, max_new_tokens, policy, gate_threshold, temperature, top_p, seed, return_logits):
        from .dispatch import make_batch
        from .sampling import Sampler

        if max_new_tokens is None:  # default: 64, or the folder's limit when smaller
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS_RUN, self.manifest.limits["max_new_tokens"])
        pol = self.policy(policy)
        self._check(prompts, pixels, max_new_tokens)
        runner = self.runner
        batch = make_batch(prompts, pixels, self.manifest.model["image_token_id"], runner.device)
        sampler = Sampler(temperature, top_p, seed, device=runner.device)
        gen = self.dispatcher.generate(batch, pol, gate_threshold, max_new_tokens, sampler,
                                       self.manifest.model["eos_token_ids"], return_logits)
        results = []
        for i, toks in enumerate(gen.tokens):
            text = self.processor.tokenizer.decode(toks, skip_special_tokens=True) if self.processor else ""
            logits = gen.logits[i].numpy() if return_logits else None
            results.append(Result(text.strip(), toks, gen.exit_layers[i], logits, dict(gen.timings), gen.gate_probs[i],
                                  gen.finish[i], len(prompts[i]), pol.name))
        return results

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
