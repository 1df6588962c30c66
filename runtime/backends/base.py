"""The one interface every backend implements; the dispatcher knows nothing else.

A runner executes the parts of one engine folder on one device. Tensors in and out are torch
tensors on ``runner.device`` (activations in ``runner.dtype``, ids int64, logits and gate
probabilities float32). KV caches are runner-owned objects, so a backend can preallocate them
(TensorRT, CUDA graphs) or let them grow (ONNX Runtime).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dyvte.engines.manifest import Manifest

#: Segment call modes; TensorRT maps each to its own optimization profile.
MODES = ("full", "text", "decode")


class KVCache:
    """Keys/values of one decoder segment for one group of sequences."""

    length: int = 0  # cached tokens (P)
    batch: int = 0


class Runner(ABC):
    """Runs the parts of an engine folder; subclasses implement the abstract methods below."""

    name: str = "base"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    # -- parts -----------------------------------------------------------------------------
    @abstractmethod
    def vision(self, inputs):
        """The vision part on its named inputs {name: tensor} (LLaVA-style: ``pixel_values``
        [N,3,H,W] float32 -> [N,V,D]; Qwen-VL: one image's patch rows and host-computed integer
        inputs -> [tokens,D]). A bare tensor means ``{"pixel_values": tensor}``."""

    @staticmethod
    def vision_feeds(inputs) -> dict:
        """:meth:`vision`'s argument as a dict of named inputs."""
        return dict(inputs) if isinstance(inputs, dict) else {"pixel_values": inputs}

    @abstractmethod
    def embed(self, input_ids):
        """input_ids [B,S] int64 -> embeddings [B,S,D]."""

    @abstractmethod
    def new_cache(self, segment: int, batch: int, capacity: int, group: str = "full") -> KVCache:
        """An empty cache for ``batch`` sequences that will hold at most ``capacity`` tokens;
        ``group`` ("full" or "text") says which group of a request will use it."""

    @abstractmethod
    def segment(self, index: int, hidden, position_ids, attention_mask, cache: KVCache, mode: str,
                extra: dict | None = None, scores: bool = False):
        """Run decoder segment ``index`` on hidden [B,S,D]; appends S tokens to ``cache``.

        position_ids [B,S] int64 ([3,B,S] with M-RoPE, the graph's layout), attention_mask
        [B, cache.length + S] int64 (key padding); ``extra``: the other inputs the graph takes, by
        name (e.g. ``key_positions``/``token_groups`` [B, cache.length + S], ``deepstack`` [B,S,...]).
        Returns hidden [B,S,D], or (hidden, attention_last [B, cache.length + S] float32) with
        ``scores`` (the FastV scores; not available from the last segment).
        """

    # -- caches (rows join and leave the decode batch; runtime/dispatch.py DecodeBatch) -----------
    @abstractmethod
    def cache_take(self, cache: KVCache, rows, start: int) -> KVCache:
        """A cache with rows ``rows`` (int64 index [G']) of ``cache`` and its columns from ``start``
        on (leading padding trimmed), with room for what ``cache`` still had room for."""

    @abstractmethod
    def cache_join(self, caches: list, capacity: int) -> KVCache:
        """One cache holding every row of ``caches`` in order, each right-aligned at the longest
        one's length (left padding, masked by the caller), with room for ``capacity`` tokens."""

    def release_cache(self, cache: KVCache) -> None:
        """``cache`` is no longer used (pooled caches become free for reuse)."""

    def cache_nbytes(self, cache: KVCache) -> int:
        """Bytes ``cache`` holds."""
        return 0

    @abstractmethod
    def gate(self, hidden, text_mask, gate_index: int):
        """Gate of candidate number ``gate_index`` on hidden [B,S,D] -> probs [B,2] float32."""

    @abstractmethod
    def head(self, hidden):
        """hidden [B,S,D] -> logits [B,S,V] float32."""

    # -- lifecycle ---------------------------------------------------------------------------
    device = None  # torch.device
    dtype = None  # torch dtype of activations

    @property
    def limits(self) -> dict:
        """Largest batch, prompt and generation this runner accepts (``max_batch``,
        ``max_input_len``, ``max_new_tokens``): the folder's export limits unless the backend's
        engines were built with other ones."""
        return dict(self.manifest.limits)

    def synchronize(self) -> None:
        """Wait for queued device work (timings)."""

    def close(self) -> None:
        """Free sessions/engines."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
