"""PyTorch backend: the exported modules themselves (exporter/modules.py), on CPU or CUDA.

Weights come from the engine folder's ONNX initializers (no second copy on disk). KV caches
are preallocated per segment and group ([B,Hkv,capacity,hd]) and written in place. On CUDA the
decode step of every segment is captured once per cache as a CUDA graph and replayed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dyvte.engines.manifest import Manifest
from dyvte.errors import BackendUnavailableError, EngineFolderError, InputError

from .base import KVCache, Runner


def load_state(module, manifest: Manifest, part) -> None:
    """Fill ``module`` from the part's ONNX initializers (deduplicated names resolved)."""
    import torch

    from dyvte.engines.files import read_initializers

    inits = read_initializers(manifest.path(part.onnx))
    unused = set(part.info.get("unused", []))
    state = {}
    for name, ref in module.state_dict().items():
        src = inits.get(name, inits.get(part.aliases.get(name, "")))
        if src is None:
            if name not in unused:
                raise EngineFolderError(f"{part.onnx} has no weights for {name}; re-export the folder")
            src = torch.zeros_like(ref)
        if tuple(src.shape) != tuple(ref.shape):
            raise EngineFolderError(f"{part.onnx}: {name} has shape {tuple(src.shape)}, expected {tuple(ref.shape)}")
        state[name] = src
    module.load_state_dict(state)


_CAPACITY_STEP = 64  # pooled caches round their capacity up to a multiple of this
_MAX_POOLED = 64  # pooled (segment, batch, capacity) shapes before unused ones are dropped


@dataclass
class TorchCache(KVCache):
    kv: list = field(default_factory=list)  # [(key, value)] per layer, [B,Hkv,C,hd]
    mask: object = None  # [B,C] int64 key padding of every slot
    length: int = 0
    batch: int = 0
    graph: object = None  # captured decode step (CUDA)
    in_use: bool = False  # handed out for the current request (pooled caches)


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
        self.x = torch.zeros(B, 1, dim, dtype=dtype, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.start = torch.zeros((), dtype=torch.int64, device=dev)
        # the capture writes into slot `start` = 0 of scratch copies, never into the live cache
        live = cache.kv
        cache.kv = [(torch.empty_like(k), torch.empty_like(v)) for k, v in live]
        scratch = cache.kv
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                segment.forward_static(self.x, self.pos, cache.mask, scratch, self.start)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self._segment, self._mask = segment, cache.mask
        with torch.cuda.graph(self.graph):
            self.out = segment.forward_static(self.x, self.pos, cache.mask, live, self.start)
        cache.kv = live

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
                 reuse_caches: bool | None = None):
        """``random_weights`` builds the same modules with random weights (benchmarks of model
        shapes without checkpoints); ``hf_config`` then gives the vision tower's config.
        ``reuse_caches`` (default: when CUDA graphs are on) keeps caches, and the decode graphs
        captured on them, for later requests of the same batch size and rounded capacity."""
        import torch

        from dyvte.exporter.hf import build_vision_encoder
        from dyvte.exporter.modules import DecoderSegment, Embed, GateBank, Head, TextSpec

        super().__init__(manifest)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("the torch backend was asked for CUDA, but no CUDA GPU is visible")
        dtype = dtype or manifest.dtype
        if dtype not in ("float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = getattr(torch, dtype)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.reuse_caches = self.cuda_graphs if reuse_caches is None else reuse_caches
        self._pool: dict[tuple, list[TorchCache]] = {}  # (segment, batch, capacity) -> caches
        spec = TextSpec.from_dict(manifest.text)
        self.spec = spec

        if random_weights:
            torch.manual_seed(0)

        def build(module, part, dtype=self.dtype):
            if random_weights:
                module = module.to(self.device, dtype)
                with torch.no_grad():
                    for name, p in module.named_parameters():
                        if p.ndim > 1 or name.endswith("fc1") or name.endswith("fc2"):
                            p.normal_(0.0, 0.02)
                        elif name.endswith("bias"):
                            p.zero_()
                        else:
                            p.fill_(1.0)
            else:
                load_state(module, manifest, part)
            return module.to(self.device, dtype).eval()


        inv_freq = None
        if random_weights:
            hd = spec.rope_dim
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.segments = [build(DecoderSegment(spec, *p.layers, inv_freq), p) for p in manifest.segments]
        for seg in self.segments:  # RoPE frequencies stay float32 whatever the dtype
            seg.inv_freq = seg.inv_freq.float()
        self.embed_mod = build(Embed(spec), manifest.parts["embed"])
        self.head_mod = build(Head(spec), manifest.parts["head"])
        from transformers import LlavaConfig

        from dyvte.models import quiet_transformers

        quiet_transformers()
        if hf_config is None:
            hf_config = LlavaConfig.from_dict(json.loads(manifest.path(manifest.data["hf_config"]).read_text()))
        self.vision_mod = build(build_vision_encoder(hf_config, torch.float32), manifest.parts["vision"])
        self.gate_mod = None
        if manifest.gate is not None:
            g = manifest.gate
            hidden = int(g.info["hidden"])
            # float32 like the gate graph, so that exit decisions agree across backends
            self.gate_mod = build(GateBank(len(g.info["layers"]), hidden, spec.hidden_size), g, torch.float32)

    # -- parts ---------------------------------------------------------------------------------
    def _no_grad(fn):  # noqa: N805
        def wrapper(self, *a, **k):
            import torch

            with torch.no_grad():
                return fn(self, *a, **k)

        return wrapper

    @_no_grad
    def vision(self, pixel_values):
        return self.vision_mod(pixel_values.to(self.device, self.dtype))

    @_no_grad
    def embed(self, input_ids):
        return self.embed_mod(input_ids.to(self.device))

    def begin_request(self):
        for caches in self._pool.values():
            for c in caches:
                c.in_use = False

    def new_cache(self, segment, batch, capacity):
        if not self.reuse_caches:
            return self._alloc_cache(segment, batch, capacity)
        capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP  # similar requests share caches and graphs
        key = (segment, batch, capacity)
        caches = self._pool.setdefault(key, [])
        for c in caches:
            if not c.in_use:
                c.mask.zero_()  # stale keys/values stay but are masked out
                c.length, c.in_use = 0, True
                return c
        if len(self._pool) > _MAX_POOLED:  # bound the memory held for odd shapes
            self._pool = {k: v for k, v in self._pool.items() if k == key or any(c.in_use for c in v)}
        c = self._alloc_cache(segment, batch, capacity)
        c.in_use = True
        caches.append(c)
        return c

    def _alloc_cache(self, segment, batch, capacity):
        import torch

        n_layers = len(self.segments[segment].layers)
        shape = (batch, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        kv = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
               torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(n_layers)]
        mask = torch.zeros(batch, capacity, dtype=torch.int64, device=self.device)
        return TorchCache(kv, mask, 0, batch)

    @_no_grad
    def segment(self, index, hidden, position_ids, attention_mask, cache, mode):
        import torch

        seg = self.segments[index]
        P, S = cache.length, hidden.shape[1]
        if P + S > cache.mask.shape[1]:
            raise InputError(f"KV cache of segment {index} holds {cache.mask.shape[1]} tokens; {P + S} requested")
        cache.mask[:, P: P + S] = attention_mask[:, P: P + S]
        hidden = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        if mode == "decode" and self.cuda_graphs:
            if cache.graph is None:
                cache.graph = _DecodeGraph(seg, cache, self.spec.hidden_size, self.dtype)
            out = cache.graph(hidden, position_ids, P)
        else:
            start = torch.tensor(P, device=self.device)
            out = seg.forward_static(hidden, position_ids, cache.mask, cache.kv, start, length=P + S)
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
