"""ONNX Runtime backend: one InferenceSession per part, CPU by default."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from dyvte.engines.manifest import Manifest
from dyvte.errors import BackendUnavailableError, EngineFolderError

from .base import KVCache, Runner


_GLOBAL_POOL = None  # intra-op threads of the process-wide pool, once created
_SHARED_ARENA = None  # whether the process-wide CPU memory arena is registered
_POOL_LOCK = threading.Lock()


def _use_shared_arena() -> bool:
    """Give every session of the process one CPU memory arena.

    Each session's own arena keeps the largest buffers it ever needed, so an engine folder's dozen
    sessions hold the sum of their peaks (a LLaVA-NeXT-shaped 16-layer model with 2,928 visual
    tokens reached 21.8 GB, 5.1 GB with one shared arena; README "Memory")."""
    global _SHARED_ARENA
    import onnxruntime as ort

    with _POOL_LOCK:
        if _SHARED_ARENA is None:
            try:
                mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(mem, ort.OrtArenaCfg(0, -1, -1, -1))
                _SHARED_ARENA = True
            except Exception:  # an allocator registered by someone else, or an older ONNX Runtime
                _SHARED_ARENA = False
        return _SHARED_ARENA


def _use_global_thread_pool(threads: int | None) -> bool:
    """Share one intra-op thread pool between all sessions of the process.

    An engine folder runs a dozen sessions back to back; with a pool per session the idle
    pools' spinning threads steal the cores of the running one (3.6x slower decoding measured
    on 2 cores). The pool must be sized before ONNX Runtime creates its environment.
    """
    global _GLOBAL_POOL
    import onnxruntime as ort

    with _POOL_LOCK:  # pipelines may be loaded from several threads
        if _GLOBAL_POOL is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            size = int(threads or cores or 1)
            try:
                ort.set_global_thread_pool_sizes(size, 1)
                _GLOBAL_POOL = size
            except Exception:  # environment already created by someone else: per-session pools
                _GLOBAL_POOL = 0
        return bool(_GLOBAL_POOL) and threads in (None, _GLOBAL_POOL)


def create_session(path, providers=None, threads: int | None = None):
    """An ORT session with full graph optimisation; clear errors for broken files."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed; `pip install onnxruntime`") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    cpu_only = not providers or all(p == "CPUExecutionProvider" for p in providers)
    if cpu_only and _use_shared_arena():
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if _use_global_thread_pool(threads):
        opts.use_per_session_threads = False
    else:
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        msg = str(exc).splitlines()[0][:300]
        raise EngineFolderError(f"ONNX Runtime cannot load {path}: {msg}; re-export the folder") from None


@dataclass
class OrtCache(KVCache):
    tensors: list = field(default_factory=list)  # past.{i}.key/value, [B,Hkv,P,hd] each
    length: int = 0
    batch: int = 0


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, providers=None, threads: int | None = None):
        import torch

        super().__init__(manifest)
        on_cpu = not providers or all(p == "CPUExecutionProvider" for p in providers)
        if manifest.dtype == "bfloat16" and on_cpu:
            raise BackendUnavailableError(
                f"{manifest.root} holds bfloat16 graphs, which ONNX Runtime's CPU provider cannot run (no bf16 "
                "kernels); use backend='torch' (CPU or CUDA) or 'tensorrt', or re-export with --dtype float16/float32"
            )
        self.device = torch.device("cpu")
        self.dtype = getattr(torch, manifest.dtype)
        self.sessions = {
            name: create_session(manifest.path(part.onnx), providers, threads) for name, part in manifest.parts.items()
        }
        self._segment_names = [p.name for p in manifest.segments]
        self._past_names = [[i["name"] for i in p.inputs if i["name"].startswith("past.")] for p in manifest.segments]
        self._output_names = {name: [o.name for o in sess.get_outputs()] for name, sess in self.sessions.items()}

    def _run(self, part: str, feeds: dict) -> list:
        import torch

        arrays = {k: v.detach().contiguous().numpy() for k, v in feeds.items()}
        return [torch.from_numpy(o) for o in self.sessions[part].run(None, arrays)]

    def vision(self, inputs):
        feeds = {k: v.float() if v.is_floating_point() else v for k, v in self.vision_feeds(inputs).items()}
        return self._run("vision", feeds)[0]

    def embed(self, input_ids):
        return self._run("embed", {"input_ids": input_ids})[0]

    def new_cache(self, segment, batch, capacity, group="full"):
        import torch

        t = self.manifest.text
        empty = torch.zeros(batch, t["num_kv_heads"], 0, t["head_dim"], dtype=self.dtype)
        return OrtCache([empty] * len(self._past_names[segment]), 0, batch)

    def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
        name = self._segment_names[index]
        feeds = {"hidden_states": hidden, "position_ids": position_ids, "attention_mask": attention_mask}
        feeds.update(extra or {})
        feeds.update(zip(self._past_names[index], cache.tensors))
        outs = dict(zip(self._output_names[name], self._run(name, feeds)))
        cache.tensors = [outs["present" + n[len("past"):]] for n in self._past_names[index]]
        cache.length += hidden.shape[1]
        if not scores:
            return outs["hidden_states_out"]
        if "attention_last" not in outs:
            raise EngineFolderError(f"{name} returns no FastV scores (attention_last): the last segment has none, "
                                    "and folders exported before dyvte 0.2 lack them; re-export the folder")
        return outs["hidden_states_out"], outs["attention_last"]

    def cache_take(self, cache, rows, start):
        return OrtCache([t[rows][:, :, start:] for t in cache.tensors], cache.length - start, len(rows))

    def cache_join(self, caches, capacity):
        import torch

        P = max(c.length for c in caches)

        def pad(t, n):  # [B,Hkv,n',hd] -> [B,Hkv,n,hd], zeros on the left
            return t if t.shape[2] == n else torch.cat([t.new_zeros(*t.shape[:2], n - t.shape[2], t.shape[3]), t], 2)

        tensors = [torch.cat([pad(c.tensors[i], P) for c in caches]) for i in range(len(caches[0].tensors))]
        return OrtCache(tensors, P, sum(c.batch for c in caches))

    def cache_nbytes(self, cache):
        return sum(t.nbytes for t in cache.tensors)

    def gate(self, hidden, text_mask, gate_index):
        import torch

        feeds = {"hidden_states": hidden, "text_mask": text_mask, "gate_index": torch.tensor(gate_index)}
        return self._run("gate", feeds)[0]

    def head(self, hidden):
        return self._run("head", {"hidden_states": hidden})[0]

    def close(self):
        self.sessions.clear()
