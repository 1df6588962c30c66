"""Defaults of every tunable, in one place."""

from __future__ import annotations

#: Engine-folder format written by this version (``manifest.json`` field ``schema_version``).
SCHEMA_VERSION = 3  # 2: float32 RoPE frequencies in fp16/bf16 graphs, TensorRT plans named by key;
#                      3: projection weights stored [in, out] (the layout MatMul consumes), fused ONNX Runtime
#                         segment graphs, quantized weights (``quantization``)
MANIFEST_NAME = "manifest.json"

#: ONNX opset of exported graphs. 17 is the newest opset the TorchScript exporter and every
#: TensorRT release we target (10.x, 11.x) agree on, and it has LayerNormalization.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20

#: Export precision of the graphs. float32 is what ONNX Runtime on CPU runs fastest and what
#: validation against the PyTorch model is tightest for.
DEFAULT_DTYPE = "float32"
DTYPES = ("float32", "float16", "bfloat16")

#: Weight quantization of the decoder segments and the head (``dyvte-export --quantize``), with ONNX
#: Runtime's own quantizer (``MatMulNBits``, exporter/quantize.py): 8- or 4-bit symmetric weight
#: blocks. Both need ``--dtype float32``; vision, embeddings and gate stay float.
QUANTIZE_SCHEMES = ("int8", "int4")
#: Defaults of both schemes (README "Fused and quantized engines" has the measurement): 32-weight
#: blocks, accuracy level 4 (ONNX Runtime's CPU kernel quantizes activation rows to int8 per block).
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
#: Validation of quantized parts against the float PyTorch model, per scheme:
#: |ours - torch| <= atol + rtol * max|torch| (quantization error, not a bug, fills most of it).
QUANT_TOLERANCES = {"int8": (5e-2, 1.5e-1), "int4": (1e-1, 4e-1)}
#: End-to-end check of a quantized folder after export: greedy tokens of the quantized pipeline vs
#: the float model (teacher-forced) on this many synthetic prompts of this many new tokens.
QUANT_CHECK_PROMPTS = 3
QUANT_CHECK_TOKENS = 8

#: Candidate exit layers: every ``L // CANDIDATE_DIVISOR`` layers (7 candidates for L = 32:
#: 4, 8, ..., 28). See README "Choosing candidates" for the measurement behind this default.
CANDIDATE_DIVISOR = 8

#: Limits recorded in the manifest; the runtime rejects requests beyond them, TensorRT
#: profiles are derived from them.
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_NEW_TOKENS = 512

#: Gate decision threshold on p[exit] (0.5 = argmax, as in the paper).
DEFAULT_GATE_THRESHOLD = 0.5
DEFAULT_POLICY = "gate"

#: Validation tolerances per export dtype: |ours - torch| <= atol + rtol * max|torch|.
TOLERANCES = {
    "float32": (1e-4, 1e-4),
    "float16": (2e-2, 2e-2),
    "bfloat16": (1e-1, 5e-2),
    **QUANT_TOLERANCES,
}

#: torch backend: pooled KV caches (and the CUDA graphs captured on them) are bucketed by
#: capacity rounded up to this many tokens, and idle ones are freed, least recently used first,
#: once the pool holds more than this many bytes (``Pipeline.load(..., cache_pool_bytes=N)``).
CACHE_CAPACITY_STEP = 64
DEFAULT_CACHE_POOL_BYTES = 4 << 30

#: dyvte serve (README "Serving").
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_MAX_WAIT_MS = 10.0  # when idle, how long a first request waits for others being received
SERVE_MAX_QUEUE = 64  # requests waiting for admission; more get 503
#: Prefill work per scheduler step, in prompt tokens through every layer (runtime/scheduler.py):
#: a step never runs more prefill than this many tokens' worth unless one segment of one prompt
#: is larger. 2,048 fits three LLaVA-1.5 prompts (576 visual tokens each) per step and splits a
#: LLaVA-NeXT prompt (up to 2,928 visual tokens) over two, so a decoding row waits at most about
#: one such prefill between two of its tokens.
SERVE_PREFILL_TOKENS = 2048
SERVE_REQUEST_TIMEOUT_S = 120.0  # queue + generation; then 504
MAX_IMAGE_BYTES = 10 << 20  # 10 MiB per encoded image (serve, Triton)
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, checked before decoding (serve, Triton)
SERVE_MAX_BODY_BYTES = 32 << 20  # one request body

#: Generation defaults.
DEFAULT_MAX_NEW_TOKENS_RUN = 64


def default_candidates(num_layers: int) -> list[int]:
    """Evenly spaced candidate exit layers in [1, L-1]."""
    step = max(1, num_layers // CANDIDATE_DIVISOR)
    return list(range(step, num_layers, step))
