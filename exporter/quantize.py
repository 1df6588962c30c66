"""Weight quantization of exported graphs with ONNX Runtime's own quantizers (``--quantize``).

Both schemes are ``matmul_nbits_quantizer.MatMulNBitsQuantizer``: symmetric weight blocks of
``block_size`` along the input axis (``int8``: 8 bits, ``int4``: 4 bits), run as ``MatMulNBits``
with ``accuracy_level`` (4: the CPU kernel quantizes each activation row to int8 per block and
computes in int8). ``quantize_dynamic`` (per-channel int8 weights, ``DynamicQuantizeMatMul``) is not
used: it quantizes the activations with ONE scale per call for the whole [B,S,D] tensor, so a
row's numbers depend on the other rows of its batch (and their padding), which breaks "a batch row
equals its single run" (tests/test_quantize.py caught it: logits off by 7e-3 in a batch).

Every MatMul whose weight is an initializer is quantized: in dyvte's graphs those are exactly the
projections (q/k/v, o, gate/up, down) and the lm_head, as :class:`~dyvte.exporter.modules.Linear`
feeds its [in, out] weight straight into its MatMul; a graph where one is left float is an error.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from dyvte.errors import ExportError, InputError
from dyvte.settings import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, QUANTIZE_SCHEMES

#: Parts whose projections are quantized; vision, embed and gate stay float.
QUANTIZED_KINDS = ("segment", "head")


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme as the manifest records it (``quantization``)."""

    name: str  # int8 | int4
    block_size: int = INT4_BLOCK_SIZE
    accuracy_level: int = INT4_ACCURACY_LEVEL
    symmetric: bool = True

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    @property
    def op(self) -> str:
        return "MatMulNBits"

    def to_dict(self) -> dict:
        import onnxruntime

        return {**asdict(self), "op": self.op, "parts": list(QUANTIZED_KINDS),
                "tool": f"onnxruntime.quantization {onnxruntime.__version__}"}

    def describe(self) -> str:
        return f"{self.name} weights (MatMulNBits, block {self.block_size}, accuracy level {self.accuracy_level})"


def make_scheme(name: str | None, dtype: str, block_size: int | None = None,
                accuracy_level: int | None = None) -> Scheme | None:
    """The checked scheme of ``--quantize`` (None: no quantization); one-line errors otherwise."""
    if name is None:
        if block_size is not None or accuracy_level is not None:
            raise InputError("--block-size and --accuracy-level apply to --quantize; add it or drop them")
        return None
    if name not in QUANTIZE_SCHEMES:
        raise InputError(f"--quantize {name} is not one of {', '.join(QUANTIZE_SCHEMES)}")
    if dtype != "float32":
        raise InputError(f"--quantize {name} needs --dtype float32 (it quantizes float32 weights; got --dtype {dtype})")
    block = INT4_BLOCK_SIZE if block_size is None else int(block_size)
    level = INT4_ACCURACY_LEVEL if accuracy_level is None else int(accuracy_level)
    if block < 16 or block & (block - 1):
        raise InputError(f"--block-size {block} must be a power of two >= 16 (MatMulNBits)")
    if level not in (0, 1, 2, 3, 4):
        raise InputError(f"--accuracy-level {level} must be 0-4 (0/1 float32, 2 fp16, 3 bf16, 4 int8 compute)")
    return Scheme(name, block, level)


@contextlib.contextmanager
def _quiet():
    """The quantizers log advice and per-node progress at INFO/WARNING on the root logger."""
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime.quantization",
                                              "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _float_weight_matmuls(model) -> list[str]:
    """MatMul nodes whose B input is a float initializer (what a quantizer should have taken)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name or n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def quantize_graph(src: Path, dst: Path, scheme: Scheme) -> list[Path]:
    """Quantize the ONNX graph at ``src`` (with its external data) into ``dst`` (+ ``dst.data``)."""
    from dyvte.engines.files import save_onnx

    try:
        with _quiet():
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(str(src), bits=scheme.bits, block_size=scheme.block_size, is_symmetric=True,
                                     accuracy_level=scheme.accuracy_level, op_types_to_quantize=("MatMul",))
            q.process()
            model = q.model.model
    except ImportError as exc:
        raise ExportError(f"ONNX Runtime's quantizer needs {exc.name}, which is missing; reinstall dyvte "
                          "(`pip install -e .` pins it)") from None
    left = _float_weight_matmuls(model)
    if left:
        raise ExportError(f"{Path(src).name}: {len(left)} projection(s) left float by the {scheme.name} quantizer "
                          f"({', '.join(left[:3])}); please report it with the model config")
    return save_onnx(model, Path(dst))
