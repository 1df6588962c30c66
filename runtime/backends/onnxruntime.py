"""ONNX Runtime backend: one InferenceSession per part, on the CPU or (onnxruntime-gpu) CUDA.

Decoder segments run through I/O binding on torch tensors of the runner's device, so hidden
states and KV caches stay where they are (host memory, or the GPU). A folder's fused segment
graphs (exporter/fused.py: GroupQueryAttention with an in-place static cache) are preferred where
they exist: one cache buffer per layer of ``capacity`` slots is bound as both past and present, so
a decode step copies no cache. Plain graphs (MatMul/Softmax attention) return each present as a
new tensor [B,Hkv,P+S,hd], as TensorRT's input graphs do.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from dyvte.engines.manifest import Manifest
from dyvte.errors import BackendUnavailableError, EngineFolderError, InputError

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


def installed_packages() -> list[str]:
    """The ONNX Runtime distributions installed (``onnxruntime``, ``onnxruntime-gpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(dist)
            found.append(dist)
        except PackageNotFoundError:
            pass
    return found


def import_onnxruntime():
    """The onnxruntime module, or a one-line error naming the fix."""
    packages = installed_packages()
    if len(packages) > 1:
        raise BackendUnavailableError(
            "both onnxruntime and onnxruntime-gpu are installed; they ship the same module and overwrite each other: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1 (GPU) or "
            "onnxruntime==1.31.1 (CPU); scripts/setup.sh --gpu does this")
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed; `pip install onnxruntime==1.31.1` "
                                      "(or onnxruntime-gpu for CUDA)") from None
    return ort


def create_session(path, providers=None, threads: int | None = None):
    """An ORT session with full graph optimisation; clear errors for broken files."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    cpu_only = not providers or all(_provider_name(p) == "CPUExecutionProvider" for p in providers)
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


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


CUDA_EP = "CUDAExecutionProvider"


def resolve_device(device: str | None):
    """The torch device the runner works on: ``cpu``, or ``cuda[:N]`` where onnxruntime-gpu, a
    CUDA-enabled torch and a GPU are present (None: CUDA when all are, else the CPU). One-line
    errors name what is missing when CUDA is asked for."""
    import torch

    ort = import_onnxruntime()
    want = torch.device(device) if device else None
    if want is not None and want.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"the onnxruntime backend runs on cpu or cuda[:N], not {device}")
    if want is not None and want.type == "cpu":
        return want
    gpu_package = CUDA_EP in ort.get_available_providers()  # listed by onnxruntime-gpu even without a GPU
    problem = None
    if not gpu_package:
        problem = ("this ONNX Runtime is the CPU package (onnxruntime); for CUDA: pip uninstall -y onnxruntime && "
                   "pip install onnxruntime-gpu==1.31.1 (scripts/setup.sh --gpu)")
    elif not torch.cuda.is_available():
        problem = ("no CUDA GPU is visible to torch (the onnxruntime backend keeps tensors and KV caches in torch "
                   "CUDA tensors: a GPU and a CUDA build of torch are needed)")
    elif want is not None and want.index is not None and want.index >= torch.cuda.device_count():
        problem = f"device {want} does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible"
    if problem:
        if want is None:
            return torch.device("cpu")
        raise BackendUnavailableError(f"onnxruntime on {device}: {problem}")
    return torch.device("cuda", want.index if want is not None and want.index is not None else 0)


@dataclass
class OrtCache(KVCache):
    """A segment's caches: ``kv`` [(key, value)] per layer, torch tensors on the runner's device.
    Plain graphs: exactly the ``length`` cached tokens, [B,Hkv,P,hd], replaced by each call's
    presents. Fused graphs (``static``): buffers [B,Hkv,capacity,hd] holding the tokens in slots
    0..length-1, written in place."""

    kv: list = field(default_factory=list)
    length: int = 0
    batch: int = 0
    static: bool = False

    @property
    def capacity(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0


def _np_dtype(t):
    import numpy as np
    import torch

    types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
             torch.bool: np.bool_}
    if t.dtype not in types:
        raise BackendUnavailableError(f"onnxruntime backend: tensors of {t.dtype} cannot be bound")
    return types[t.dtype]


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, providers=None, threads: int | None = None, device: str | None = None,
                 graphs: str = "auto"):
        """``device``: ``cpu``, ``cuda[:N]`` (onnxruntime-gpu) or None (CUDA when usable, else the
        CPU); ``providers`` overrides the execution providers outright (CPU tensors). ``graphs``:
        which segment graphs to run, ``fused`` (the folder's fused graphs), ``plain`` or ``auto``
        (fused where the folder has them and they suit the device)."""
        import torch

        super().__init__(manifest)
        if graphs not in ("auto", "fused", "plain"):
            raise InputError(f"graphs must be auto, fused or plain, not {graphs!r}")
        self.device = torch.device("cpu") if providers else resolve_device(device)
        on_cuda = self.device.type == "cuda"
        if providers is None:
            providers = ([(CUDA_EP, {"device_id": self.device.index}), "CPUExecutionProvider"] if on_cuda
                         else ["CPUExecutionProvider"])
        if manifest.dtype == "bfloat16":
            raise BackendUnavailableError(
                f"{manifest.root} holds bfloat16 graphs, which ONNX Runtime's CPU provider cannot run (no bf16 "
                "kernels); use backend='torch' (CPU or CUDA) or 'tensorrt', or re-export with --dtype float16/float32"
            )
        self.dtype = getattr(torch, manifest.dtype)
        self.graphs = graphs
        self.parts = {}
        for name, part in manifest.parts.items():
            chosen = part
            if part.kind == "segment":
                fused = part.variant("fused")
                # CUDA's GroupQueryAttention takes fp16/bf16 only: float32 fused graphs would run it on the CPU
                prefer = graphs == "fused" or graphs == "auto" and not (on_cuda and manifest.dtype == "float32")
                chosen = (fused if prefer else part.variant("plain")) or part
                if graphs != "auto" and chosen.graph != graphs:
                    raise EngineFolderError(f"{manifest.root} has no {graphs} graph for {name} (it has "
                                            f"{chosen.graph}); re-export it{' without --no-fused' if graphs == 'fused' else ''}")
            self.parts[name] = chosen
        self.sessions = {}
        for name, part in self.parts.items():
            self.sessions[name] = create_session(manifest.path(part.onnx), providers, threads)
            if on_cuda and len(self.sessions) == 1 and self.sessions[name].get_providers()[0] != CUDA_EP:
                raise BackendUnavailableError(
                    f"onnxruntime-gpu could not start its CUDA provider on {self.device} (CUDA 12/13 or cuDNN 9 "
                    "libraries missing, or the driver too old); run with device='cpu'")
        self._segment_names = [p.name for p in manifest.segments]
        self._segments = [self.parts[n] for n in self._segment_names]
        self._past_names = [[i["name"] for i in p.inputs if i["name"].startswith("past.")] for p in self._segments]
        self._output_names = {name: [o.name for o in sess.get_outputs()] for name, sess in self.sessions.items()}

    @property
    def segment_graphs(self) -> list[str]:
        """The graph kind each segment runs (``plain`` or ``fused``)."""
        return [p.graph for p in self._segments]

    def _run(self, part: str, feeds: dict) -> list:
        """A part on host arrays (vision, embed, gate, head: small tensors, once per step at most)."""
        import torch

        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        outs = [torch.from_numpy(o) for o in self.sessions[part].run(None, arrays)]
        return outs if self.device.type == "cpu" else [o.to(self.device) for o in outs]

    def _run_bound(self, part: str, inputs: dict, outputs: dict) -> None:
        """Run ``part`` with every input and output bound to torch tensors on the device (I/O
        binding; an output may be an input's own buffer: in-place caches)."""
        import torch

        sess = self.sessions[part]
        io = sess.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []
        for name, t in inputs.items():
            t = t.detach().to(self.device).contiguous()
            keep.append(t)
            io.bind_input(name, kind, index, _np_dtype(t), tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            io.bind_output(name, kind, index, _np_dtype(t), tuple(t.shape), t.data_ptr())
        if kind == "cuda":
            torch.cuda.synchronize(self.device)  # inputs written by torch's stream; ORT waits for its own
        sess.run_with_iobinding(io)
        del keep

    def vision(self, inputs):
        feeds = {k: v.float() if v.is_floating_point() else v for k, v in self.vision_feeds(inputs).items()}
        return self._run("vision", feeds)[0]

    def embed(self, input_ids):
        return self._run("embed", {"input_ids": input_ids})[0]

    def new_cache(self, segment, batch, capacity, group="full"):
        import torch

        t = self.manifest.text
        static = self._segments[segment].graph == "fused"
        shape = (batch, t["num_kv_heads"], capacity if static else 0, t["head_dim"])
        kv = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
               torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(len(self._past_names[segment]) // 2)]
        return OrtCache(kv, 0, batch, static)

    def segment(self, index, hidden, position_ids, attention_mask, cache, mode, extra=None, scores=False):
        import torch

        name = self._segment_names[index]
        B, S = hidden.shape[0], hidden.shape[1]
        P, T = cache.length, cache.length + S
        if cache.static and T > cache.capacity:
            raise InputError(f"KV cache of segment {index} holds {cache.capacity} tokens; {T} requested")
        if cache.static and P > 0 and S > 1 and B > 1:  # GQA takes a cached batch one new token at a time
            return self._segment_by_row(index, hidden, position_ids, attention_mask, cache, mode, extra, scores)
        inputs = {"hidden_states": hidden.to(self.dtype), "position_ids": position_ids, "attention_mask": attention_mask}
        inputs.update(extra or {})
        t = self.manifest.text
        out = torch.empty(B, S, hidden.shape[2], dtype=self.dtype, device=self.device)
        outputs = {"hidden_states_out": out}
        names = self._output_names[name]
        last = torch.empty(B, T, dtype=torch.float32, device=self.device) if "attention_last" in names else None
        if last is not None:
            outputs["attention_last"] = last
        present = []
        for i, (k, v) in enumerate(cache.kv):
            pk, pv = self._past_names[index][2 * i: 2 * i + 2]
            inputs[pk], inputs[pv] = k, v
            if cache.static:  # written in place
                present.append((k, v))
            else:
                shape = (B, t["num_kv_heads"], T, t["head_dim"])
                present.append((torch.empty(shape, dtype=self.dtype, device=self.device),
                                torch.empty(shape, dtype=self.dtype, device=self.device)))
            outputs["present" + pk[len("past"):]], outputs["present" + pv[len("past"):]] = present[-1]
        self._run_bound(name, inputs, outputs)
        cache.kv = present
        cache.length = T
        if not scores:
            return out
        if last is None:
            raise EngineFolderError(f"{name} returns no FastV scores (attention_last): the last segment has none, "
                                    "and folders exported before dyvte 0.2 lack them; re-export the folder")
        return out, last

    def _segment_by_row(self, index, hidden, position_ids, attention_mask, cache, mode, extra, scores):
        """:meth:`segment` one row at a time, on each row's slice of the static caches."""
        import torch

        outs = []
        for b in range(hidden.shape[0]):
            row = OrtCache([(k[b: b + 1], v[b: b + 1]) for k, v in cache.kv], cache.length, 1, True)
            pos = position_ids[:, b: b + 1] if position_ids.dim() == 3 else position_ids[b: b + 1]
            outs.append(self.segment(index, hidden[b: b + 1], pos, attention_mask[b: b + 1], row, mode,
                                     {k: v[b: b + 1] for k, v in (extra or {}).items()}, scores))
        cache.length += hidden.shape[1]
        if not scores:
            return torch.cat(outs)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def cache_take(self, cache, rows, start):
        import torch

        rows = rows.to(self.device)
        P = cache.length - start
        if not cache.static:
            return OrtCache([(k[rows][:, :, start:], v[rows][:, :, start:]) for k, v in cache.kv], P, len(rows))
        C = max(cache.capacity - start, P + 1)
        kv = []
        for k, v in cache.kv:
            k2 = torch.zeros(len(rows), k.shape[1], C, k.shape[3], dtype=k.dtype, device=k.device)
            v2 = torch.zeros_like(k2)
            k2[:, :, :P], v2[:, :, :P] = k[rows, :, start: cache.length], v[rows, :, start: cache.length]
            kv.append((k2, v2))
        return OrtCache(kv, P, len(rows), True)

    def cache_join(self, caches, capacity):
        import torch

        P = max(c.length for c in caches)
        B = sum(c.batch for c in caches)
        static = caches[0].static
        C = max(capacity, P + 1) if static else P
        kv = []
        for i in range(len(caches[0].kv)):
            pair = []
            for j in (0, 1):
                ref = caches[0].kv[i][j]
                out = torch.zeros(B, ref.shape[1], C, ref.shape[3], dtype=ref.dtype, device=ref.device)
                at = 0
                for c in caches:  # right-aligned at P: columns [P - length, P), zeros (masked) before
                    out[at: at + c.batch, :, P - c.length: P] = c.kv[i][j][:, :, :c.length]
                    at += c.batch
                pair.append(out)
            kv.append(tuple(pair))
        return OrtCache(kv, P, B, static)

    def cache_nbytes(self, cache):
        return sum(k.nbytes + v.nbytes for k, v in cache.kv)

    def gate(self, hidden, text_mask, gate_index):
        import torch

        feeds = {"hidden_states": hidden, "text_mask": text_mask, "gate_index": torch.tensor(gate_index)}
        return self._run("gate", feeds)[0]

    def head(self, hidden):
        return self._run("head", {"hidden_states": hidden})[0]

    def synchronize(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def close(self):
        self.sessions.clear()
