"""PyTorch backend: the exported modules themselves (exporter/modules.py), on CPU or CUDA.

Modules are built with their parameters on the meta device and every weight is read from the
engine folder's ONNX initializers straight into the target device and dtype, one tensor at a
time (no second copy on disk, no float32 model in host memory). Attention runs through
``scaled_dot_product_attention``. KV caches are preallocated per segment and group
([B,Hkv,capacity,hd]) and written in place; with ``reuse_caches`` they are pooled per shape
bucket under a byte budget. On CUDA the decode step of every segment is captured once per
pooled cache (one per bucket) as a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

from dyvte.engines.manifest import Manifest
from dyvte.errors import BackendUnavailableError, EngineFolderError, InputError
from dyvte.settings import CACHE_CAPACITY_STEP, DEFAULT_CACHE_POOL_BYTES

from .base import KVCache, Runner

#: Buffers that stay float32 whatever the activation dtype (position math).
FLOAT32_BUFFERS = ("inv_freq", "inv_freq_sliding")


def materialize(build, source, device, dtype):
    """``build()`` a module with parameters on the meta device, then fill every parameter and
    persistent buffer from ``source(name, like) -> tensor`` directly in ``device``/``dtype``
    (integer tensors and :data:`FLOAT32_BUFFERS` keep their dtype). Non-persistent buffers of
    Hugging Face submodules (e.g. CLIP's position ids) are recomputed by their own init.
    Peak memory beyond the result: one tensor as ``source`` returns it.
    """
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    with torch.device("meta"), hf_init.meta_device_safe_creation_ops():
        module = build()
    state = {}
    for name, like in module.state_dict(keep_vars=True).items():
        keep = not like.is_floating_point() or name.rsplit(".", 1)[-1] in FLOAT32_BUFFERS
        src = source(name, like)
        if tuple(src.shape) != tuple(like.shape):
            raise EngineFolderError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(like.shape)}; "
                                    "re-export the folder")
        state[name] = src.to(device=device, dtype=like.dtype if keep else dtype)
        del src
    module.load_state_dict(state, assign=True)
    del state
    for t in module.state_dict(keep_vars=True).values():
        t._is_hf_initialized = True  # HF init below must leave loaded weights alone
    meta_buffers = [(mod, name) for mod in module.modules() for name, b in mod._buffers.items()
                    if b is not None and b.device.type == "meta"]
    for mod, name in meta_buffers:
        mod._buffers[name] = torch.empty_like(mod._buffers[name], device=device)
    if meta_buffers:
        for mod in module.modules():
            if isinstance(mod, PreTrainedModel):
                mod.initialize_weights()
        if any(mod._buffers[name].device.type == "meta" for mod, name in meta_buffers):
            raise EngineFolderError(f"{type(module).__name__}: buffers left unmaterialized")
    return module.eval()


def onnx_source(onnx_path, aliases: dict, unused=()):
    """``source`` for :func:`materialize`: an ONNX file's initializers (``aliases``: module names
    the exporter deduplicated -> initializer; ``unused`` parameters it dropped read as zeros)."""
    import torch

    from dyvte.engines.files import OnnxWeights

    weights = OnnxWeights(onnx_path)
    unused = set(unused)

    def get(name, like):
        key = name if name in weights else aliases.get(name)
        if key is None or key not in weights:
            if name in unused:
                return torch.zeros(like.shape, dtype=like.dtype)
            raise EngineFolderError(f"{onnx_path} has no weights for {name}; re-export the folder")
        return weights[key]

    return get


def part_builder(kind: str, info: dict, spec, family, hf_config, dtype):
    """A function building the (empty) module behind an exported part, for :func:`materialize`."""
    from dyvte.exporter.modules import DecoderSegment, Embed, GateBank, Head

    if kind == "segment":
        return lambda: DecoderSegment(spec, *info["layers"])
    if kind == "embed":
        return lambda: Embed(spec)
    if kind == "head":
        return lambda: Head(spec)
    if kind == "gate":
        return lambda: GateBank(len(info["layers"]), int(info["hidden"]), spec.hidden_size)
    if kind == "vision":
        return lambda: family.vision_encoder(hf_config, dtype, device="meta")
    raise EngineFolderError(f"unknown part kind '{kind}'; re-export the folder")


def random_source(spec, device, seed: int = 0):
    """``source`` for :func:`materialize`: random weights made on ``device`` (benchmarks of model
    shapes without checkpoints): N(0, 0.02) matrices, zero biases, unit norms, default RoPE."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def get(name, like):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in FLOAT32_BUFFERS:
            hd = spec.rope_dim
            return 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.empty(like.shape, dtype=like.dtype if like.dtype != torch.float64 else torch.float32, device=device)
        if not t.is_floating_point():
            return t.zero_()
        if like.ndim > 1 or leaf in ("fc1", "fc2"):
            return t.normal_(0.0, 0.02, generator=gen)
        return t.zero_() if leaf == "bias" else t.fill_(1.0)

    return get


@dataclass
class TorchCache(KVCache):
    kv: list = field(default_factory=list)  # [(key, value)] per layer, [B,Hkv,C,hd]
    mask: object = None  # [B,C] int64 key padding of every slot
    length: int = 0
    batch: int = 0
    graph: object = None  # captured decode step (CUDA)
    in_use: bool = False  # handed out and not released yet (pooled caches)
    nbytes: int = 0
    last_used: int = 0  # hand-out counter when last handed out (pool eviction order)
    keys: dict = field(default_factory=dict)  # key-side graph inputs per slot, [B,C] int64 (key_positions, ...)
    key: tuple = ()  # (segment, group, batch, capacity): its pool bucket


class _DecodeGraph:
    """A CUDA graph of one segment's decode step on one cache (static input/output buffers)."""

    def __init__(self, segment, cache: TorchCache, dim: int, dtype):
        import torch

        dev = cache.mask.device
        with torch.cuda.device(dev):
            self._capture(segment, cache, dim, dtype, dev)

    def _capture(self, segment, cache: TorchCache, dim: int, dtype, dev):
        import torch

        B = cache.batch
        rows = segment.spec.rope_rows
        self.x = torch.zeros(B, 1, dim, dtype=dtype, device=dev)
        self.pos = torch.zeros(*((rows,) if rows > 1 else ()), B, 1, dtype=torch.int64, device=dev)  # graph layout
        self.start = torch.zeros((), dtype=torch.int64, device=dev)
        # warm-up writes into slot `start` = 0 of a scratch layer, never into the live cache
        live = cache.kv
        scratch = [(torch.empty_like(live[0][0]), torch.empty_like(live[0][1]))] * len(live)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                segment.forward_static(self.x, self.pos, cache.mask, scratch, self.start, keys=cache.keys)
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = segment.forward_static(self.x, self.pos, cache.mask, live, self.start, keys=cache.keys)

    def __call__(self, x, pos, start: int):
        self.x.copy_(x)
        self.pos.copy_(pos)
        self.start.fill_(start)
        self.graph.replay()
        return self.out


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, manifest: Manifest, device: str | None = None, dtype: str | None = None,
                 cuda_graphs: bool = True, random_weights: bool = False, hf_config=None,
                 reuse_caches: bool | None = None, cache_pool_bytes: int = DEFAULT_CACHE_POOL_BYTES):
        """``device`` (``cpu``, ``cuda``, ``cuda:N``; default CUDA when visible) and ``dtype``
        (default the folder's) of the activations. ``random_weights`` builds the same modules
        with random weights (benchmarks of model shapes without checkpoints); ``hf_config`` then
        gives the vision tower's config. ``reuse_caches`` (default: when CUDA graphs are on) keeps
        caches, and the decode graphs captured on them, for later requests of the same shape
        bucket (segment, group, batch, capacity rounded up to 64); idle pooled caches are freed,
        least recently used first, once the pool holds more than ``cache_pool_bytes``."""
        import torch

        from dyvte.exporter.modules import TextSpec

        super().__init__(manifest)
        if manifest.quantization and not random_weights:
            raise BackendUnavailableError(
                f"{manifest.root} holds {manifest.quantization['name']} weights in ONNX Runtime's quantized ops, which "
                "the torch backend does not run; use backend='onnxruntime', or export without --quantize for torch")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailableError("the torch backend was asked for CUDA, but no CUDA GPU is visible")
            if self.device.index is not None and self.device.index >= torch.cuda.device_count():
                raise BackendUnavailableError(f"device {self.device} does not exist: {torch.cuda.device_count()} "
                                              "CUDA GPU(s) are visible")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type != "cpu":
            raise BackendUnavailableError(f"the torch backend runs on cpu or cuda[:N], not {self.device}")
        dtype = dtype or manifest.dtype
        if dtype not in ("float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if cache_pool_bytes < 0:
            raise InputError("cache_pool_bytes must be >= 0")
        self.dtype = getattr(torch, dtype)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.reuse_caches = self.cuda_graphs if reuse_caches is None else reuse_caches
        self.cache_pool_bytes = int(cache_pool_bytes)
        self._pool: dict[tuple, list[TorchCache]] = {}  # shape bucket -> caches (and their decode graphs)
        self._uses = 0
        self.graph_captures = 0  # decode graphs captured so far (one per pooled cache)
        self.cache_allocations = 0  # caches allocated so far (pooling reuses them)
        spec = TextSpec.from_dict(manifest.text)
        self.spec = spec

        from dyvte.families import family_named
        from dyvte.models import config_from_dict

        family = family_named(manifest.model["family"])
        if hf_config is None:
            hf_config = config_from_dict(json.loads(manifest.path(manifest.data["hf_config"]).read_text()))

        def load(part, dtype=self.dtype):
            source = (random_source(spec, self.device) if random_weights else
                      onnx_source(manifest.path(part.onnx), part.aliases, part.info.get("unused", ())))
            return materialize(part_builder(part.kind, part.info, spec, family, hf_config, dtype), source, self.device,
                               dtype)

        self._key_inputs = [[i["name"] for i in p.inputs if i["name"] in ("key_positions", "token_groups")]
                            for p in manifest.segments]
        with self._on_device():
            self.segments = [load(p) for p in manifest.segments]
            self.embed_mod = load(manifest.parts["embed"])
            self.head_mod = load(manifest.parts["head"])
            self.vision_mod = load(manifest.parts["vision"])
            # the gate runs in float32 like the gate graph, so exit decisions agree across backends
            self.gate_mod = load(manifest.gate, torch.float32) if manifest.gate is not None else None

    def _on_device(self):
        """Context that makes ``self.device`` current (CUDA streams, kernels of cuda:N)."""
        import torch

        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- parts ---------------------------------------------------------------------------------
    def _no_grad(fn):  # noqa: N805
        def wrapper(self, *a, **k):
            import torch

            with torch.no_grad(), self._on_device():
                return fn(self, *a, **k)

        return wrapper

    @_no_grad
    def vision(self, inputs):
        feeds = self.vision_feeds(inputs)
        names = [t["name"] for t in self.manifest.parts["vision"].inputs] or list(feeds)  # the graph's input order
        args = [feeds[n] for n in names]
        return self.vision_mod(*[a.to(self.device, self.dtype) if a.is_floating_point() else a.to(self.device)
                                 for a in args])

    @_no_grad
    def embed(self, input_ids):
        return self.embed_mod(input_ids.to(self.device))

    def new_cache(self, segment, batch, capacity, group="full"):
        if not self.reuse_caches:
            return self._alloc_cache(segment, batch, capacity, group)
        capacity = -(-capacity // CACHE_CAPACITY_STEP) * CACHE_CAPACITY_STEP  # similar requests share a bucket
        key = (segment, group, batch, capacity)
        bucket = self._pool.setdefault(key, [])
        c = next((c for c in bucket if not c.in_use), None)
        if c is None:
            c = self._alloc_cache(segment, batch, capacity, group)
            bucket.append(c)
        c.mask.zero_()  # stale keys/values stay but are masked out
        self._uses += 1
        c.length, c.in_use, c.last_used = 0, True, self._uses
        self._evict()
        return c

    def release_cache(self, cache):
        cache.in_use = False
        self._evict()

    def _evict(self):
        """Free idle pooled caches, least recently used first, until the pool fits its budget."""
        total = self.pooled_bytes
        idle = sorted((c for b in self._pool.values() for c in b if not c.in_use), key=lambda c: c.last_used)
        for c in idle:
            if total <= self.cache_pool_bytes:
                break
            total -= c.nbytes
            self._pool[c.key].remove(c)

    @property
    def pooled_bytes(self) -> int:
        return sum(c.nbytes for b in self._pool.values() for c in b)

    def _alloc_cache(self, segment, batch, capacity, group="full"):
        import torch

        n_layers = len(self.segments[segment].layers)
        shape = (batch, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        kv = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
               torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(n_layers)]
        mask = torch.zeros(batch, capacity, dtype=torch.int64, device=self.device)
        keys = {name: torch.zeros(batch, capacity, dtype=torch.int64, device=self.device)
                for name in self._key_inputs[segment]}
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv) + mask.nbytes + sum(t.nbytes for t in keys.values())
        self.cache_allocations += 1
        return TorchCache(kv, mask, 0, batch, nbytes=nbytes, keys=keys, key=(segment, group, batch, capacity))

    def cache_nbytes(self, cache):
        return cache.nbytes

    @_no_grad
    def cache_take(self, cache, rows, start):
        segment, group, _, capacity = cache.key
        P = cache.length - start
        out = self.new_cache(segment, len(rows), max(capacity - start, P + 1), group)
        rows = rows.to(self.device)
        for (k, v), (k2, v2) in zip(cache.kv, out.kv):
            k2[:, :, :P] = k[rows, :, start: cache.length]
            v2[:, :, :P] = v[rows, :, start: cache.length]
        out.mask[:, :P] = cache.mask[rows, start: cache.length]
        for name, t in cache.keys.items():
            out.keys[name][:, :P] = t[rows, start: cache.length]
        out.length = P
        return out

    @_no_grad
    def cache_join(self, caches, capacity):
        segment, group = caches[0].key[:2]
        P = max(c.length for c in caches)
        out = self.new_cache(segment, sum(c.batch for c in caches), max(capacity, P + 1), group)
        at = 0
        for c in caches:  # right-aligned at P: columns [P - length, P)
            b, n = c.batch, c.length
            for (k, v), (k2, v2) in zip(c.kv, out.kv):
                k2[at: at + b, :, P - n: P] = k[:, :, :n]
                v2[at: at + b, :, P - n: P] = v[:, :, :n]
            out.mask[at: at + b, P - n: P] = c.mask[:, :n]
            for name, t in c.keys.items():
                out.keys[name][at: at + b, P - n: P] = t[:, :n]
            at += b
        out.length = P
        return out

    @_no_grad
    def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
        import torch

        seg = self.segments[index]
        P, S = cache.length, hidden.shape[1]
        if P + S > cache.mask.shape[1]:
            raise InputError(f"KV cache of segment {index} holds {cache.mask.shape[1]} tokens; {P + S} requested")
        cache.mask[:, P: P + S] = attention_mask[:, P: P + S]
        extra = dict(extra or {})
        for name, t in cache.keys.items():  # key-side inputs live with the cache, like the key padding
            t[:, P: P + S] = extra.pop(name)[:, P: P + S]
        data = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in extra.items()}
        hidden = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        if mode == "decode":
            data = {}  # decode tokens are never visual: token-aligned inputs such as deepstack are zero
        if mode == "decode" and self.cuda_graphs and not scores:
            if cache.graph is None:  # a pooled cache keeps its graph for later requests
                cache.graph = _DecodeGraph(seg, cache, self.spec.hidden_size, self.dtype)
                self.graph_captures += 1
            out = cache.graph(hidden, position_ids, P)
        else:
            start = torch.tensor(P, device=self.device)
            out = seg.forward_static(hidden, position_ids, cache.mask, cache.kv, start, length=P + S, scores=scores,
                                     keys=cache.keys, data=data)
        cache.length += S
        return out

    @_no_grad
    def gate(self, hidden, text_mask, gate_index):
        import torch

        return self.gate_mod(hidden.to(self.device, self.dtype), text_mask.to(self.device),
                             torch.tensor(gate_index, device=self.device))

    @_no_grad
    def head(self, hidden):
        return self.head_mod(hidden.to(self.device, self.dtype))

    def synchronize(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def close(self):
        self.segments = []
        self._pool.clear()
