"""TensorRT backend: the plans built by ``dyvte build``, run on one CUDA stream.

Buffers are torch CUDA tensors bound by address. Each segment engine has one execution
context per optimization profile (full, text, decode); all contexts share one scratch buffer
(they run one after another on the same stream). Each request's KV cache is allocated once, at
prefill, for its prompt + max_new_tokens, as two flat buffers per layer: a call reads ``past``
from one and writes ``present`` (past + new tokens) into the other, then they swap (TensorRT
outputs cannot alias inputs), so decoding allocates nothing and never leaves the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dyvte.engines.manifest import Manifest
from dyvte.errors import BackendUnavailableError, EngineFolderError, InputError

from .base import KVCache, Runner

@dataclass
class TrtCache(KVCache):
    buffers: list = field(default_factory=list)  # per layer: [(flat key, flat value), (flat key, flat value)]
    current: int = 0  # which of the two holds the cache
    length: int = 0
    batch: int = 0
    capacity: int = 0


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device: str | None = None):
        import torch

        from dyvte.engines.tensorrt import import_tensorrt

        super().__init__(manifest)
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the TensorRT backend needs a CUDA GPU; none is visible")
        info = manifest.data.get("engines", {}).get("tensorrt")
        if not info:
            raise EngineFolderError(f"{manifest.root} has no TensorRT engines; build them with `dyvte build {manifest.root}`")
        if not info.get("complete", True):
            raise EngineFolderError(f"the TensorRT build of {manifest.root} was interrupted ({len(info['parts'])} of "
                                    f"{len(manifest.parts)} plans); run `dyvte build {manifest.root}` again to finish it")
        self.trt = trt
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"the TensorRT backend runs on a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.index >= torch.cuda.device_count():
            raise BackendUnavailableError(f"device {self.device} does not exist: {torch.cuda.device_count()} CUDA GPU(s)")
        self.dtype = getattr(torch, manifest.dtype)
        with torch.cuda.device(self.device):  # engines, contexts and buffers live on this GPU
            self._load(trt, manifest, info)

    @property
    def limits(self) -> dict:
        return dict(self.manifest.data["engines"]["tensorrt"]["limits"])  # what the plans' profiles were built for

    def _load(self, trt, manifest, info):
        import torch

        self.stream = torch.cuda.Stream(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts, self.profiles = {}, {}, {}
        scratch = 0
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        for name, entry in info["parts"].items():
            engine = runtime.deserialize_cuda_engine(manifest.path(entry["plan"]).read_bytes())
            if engine is None:
                raise EngineFolderError(f"TensorRT cannot load {entry['plan']} (built with another TensorRT or GPU?); "
                                        f"rebuild it with `dyvte build {manifest.root}`")
            self.engines[name] = engine
            self.profiles[name] = entry["profiles"]
            ctxs = []
            for i in range(len(entry["profiles"])):
                ctx = engine.create_execution_context(strategy)
                ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
                ctxs.append(ctx)
                scratch = max(scratch, int(engine.get_device_memory_size_for_profile_v2(i)))
            self.contexts[name] = ctxs
        self.scratch = torch.empty(max(scratch, 256), dtype=torch.uint8, device=self.device)
        for ctxs in self.contexts.values():
            for ctx in ctxs:
                ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        self._dummy = torch.zeros(16, dtype=torch.float32, device=self.device)  # address for empty tensors
        self._segment_names = [p.name for p in manifest.segments]
        self._layers = [list(range(*p.layers)) for p in manifest.segments]

    # -- execution -----------------------------------------------------------------------------
    def _execute(self, part: str, profile: int, inputs: dict, outputs: dict | None = None) -> dict:
        """Bind inputs (and preallocated outputs), allocate the rest, run on the stream."""
        import torch

        ctx = self.contexts[part][profile]
        engine = self.engines[part]
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"{part}: input {name} of shape {tuple(t.shape)} is outside the engine's profile "
                                 f"'{self.profiles[part][profile]}'; rebuild with larger limits (dyvte build --max-...)")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        outputs = dict(outputs or {})
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            if name not in outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                dtype = _dtype_of(engine.get_tensor_dtype(name), self.trt)
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            t = outputs[name]
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise EngineFolderError(f"TensorRT execution of {part} failed; see the TensorRT log")
        return outputs

    def _on_stream(self, fn, *args):
        import torch

        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def _profile(self, part: str, mode: str) -> int:
        """Index of the optimization profile named ``mode`` in ``part``'s plan (by name, not position)."""
        try:
            return self.profiles[part].index(mode)
        except ValueError:
            raise EngineFolderError(f"{part}'s TensorRT plan has no '{mode}' profile (it has {self.profiles[part]}); "
                                    f"rebuild with `dyvte build {self.manifest.root}`") from None

    def vision(self, inputs):
        import torch

        feeds = {k: (v.to(self.device, torch.float32) if v.is_floating_point() else v.to(self.device)).contiguous()
                 for k, v in self.vision_feeds(inputs).items()}
        output = self.manifest.parts["vision"].outputs[0]["name"]
        return self._on_stream(lambda: self._execute("vision", self._profile("vision", "default"), feeds)[output])

    def embed(self, input_ids):
        ids = input_ids.to(self.device).contiguous()
        return self._on_stream(lambda: self._execute("embed", self._profile("embed", "default"),
                                                     {"input_ids": ids})["inputs_embeds"])

    def gate(self, hidden, text_mask, gate_index):
        import torch

        feeds = {"hidden_states": hidden.to(self.device, self.dtype).contiguous(),
                 "text_mask": text_mask.to(self.device).contiguous(),
                 "gate_index": torch.tensor(gate_index, device=self.device)}
        return self._on_stream(lambda: self._execute("gate", self._profile("gate", "default"), feeds)["probs"])

    def head(self, hidden):
        h = hidden.to(self.device, self.dtype).contiguous()
        return self._on_stream(lambda: self._execute("head", self._profile("head", "default"),
                                                     {"hidden_states": h})["logits"])

    def new_cache(self, segment, batch, capacity, group="full"):
        import torch

        with torch.cuda.device(self.device):
            return self._new_cache(len(self._layers[segment]), batch, capacity)

    def _new_cache(self, layers: int, batch, capacity):
        import torch

        t = self.manifest.text
        numel = batch * t["num_kv_heads"] * capacity * t["head_dim"]
        buffers = [[(torch.empty(numel, dtype=self.dtype, device=self.device),
                     torch.empty(numel, dtype=self.dtype, device=self.device)) for _ in range(2)]
                   for _ in range(layers)]
        return TrtCache(buffers, 0, 0, batch, capacity)

    def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
        t = self.manifest.text
        B, S = hidden.shape[0], hidden.shape[1]
        P = cache.length
        if P + S > cache.capacity:
            raise InputError(f"KV cache of segment {index} holds {cache.capacity} tokens; {P + S} requested")
        src, dst = cache.current, 1 - cache.current
        feeds = {"hidden_states": hidden.to(self.device, self.dtype).contiguous(),
                 "position_ids": position_ids.to(self.device).contiguous(),
                 "attention_mask": attention_mask.to(self.device).contiguous()}
        for k, v in (extra or {}).items():
            feeds[k] = (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)).contiguous()
        outs = {}
        for layer, bufs in zip(self._layers[index], cache.buffers):
            for j, kind in enumerate(("key", "value")):
                feeds[f"past.{layer}.{kind}"] = self._view(bufs[src][j], B, P)
                outs[f"present.{layer}.{kind}"] = self._view(bufs[dst][j], B, P + S)
        name = self._segment_names[index]
        profile = self._profile(name, mode)
        out = self._on_stream(lambda: self._execute(name, profile, feeds, outs))
        cache.current, cache.length = dst, P + S
        if not scores:
            return out["hidden_states_out"]
        if "attention_last" not in out:
            raise EngineFolderError(f"{name}'s plan returns no FastV scores (attention_last); re-export and rebuild")
        return out["hidden_states_out"], out["attention_last"]

    def _view(self, flat, batch: int, length: int):
        """A flat cache buffer as [batch, Hkv, length, hd]."""
        t = self.manifest.text
        hkv, hd = t["num_kv_heads"], t["head_dim"]
        return flat[: batch * hkv * length * hd].view(batch, hkv, length, hd)

    def cache_take(self, cache, rows, start):
        import torch

        P = cache.length - start
        with torch.cuda.device(self.device):
            out = self._new_cache(len(cache.buffers), len(rows), max(cache.capacity - start, P + 1))
            rows = rows.to(self.device)
            for bufs, obufs in zip(cache.buffers, out.buffers):
                for j in range(2):
                    self._view(obufs[0][j], len(rows), P).copy_(self._view(bufs[cache.current][j], cache.batch,
                                                                           cache.length)[rows, :, start:])
        out.length = P
        return out

    def cache_join(self, caches, capacity):
        import torch

        P = max(c.length for c in caches)
        B = sum(c.batch for c in caches)
        with torch.cuda.device(self.device):
            out = self._new_cache(len(caches[0].buffers), B, max(capacity, P + 1))
            for li, obufs in enumerate(out.buffers):
                for j in range(2):
                    dst = self._view(obufs[0][j], B, P)
                    dst.zero_()
                    at = 0
                    for c in caches:
                        src = self._view(c.buffers[li][c.current][j], c.batch, c.length)
                        dst[at: at + c.batch, :, P - c.length:] = src
                        at += c.batch
        out.length = P
        return out

    def cache_nbytes(self, cache):
        return sum(t.nbytes for bufs in cache.buffers for pair in bufs for t in pair)

    def synchronize(self):
        self.stream.synchronize()

    def close(self):
        if self.contexts:
            self.stream.synchronize()  # nothing may still run on the contexts or the scratch buffer
        self.contexts.clear()
        self.engines.clear()
        self.scratch = None


def _dtype_of(trt_dtype, trt):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
             trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[trt_dtype]
