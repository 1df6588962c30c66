"""The gates file (contract): safetensors with ``gate.{k}.fc1.weight`` [h, 2d] and
``gate.{k}.fc2.weight`` [2, h] per candidate layer k (torch Linear layout, no bias)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

_KEY = re.compile(r"^gate\.(\d+)\.(fc1|fc2)\.weight$")


def load_gates(path: str | Path, layers: list[int] | None = None, model_dim: int | None = None) -> dict:
    """Read gates as {layer: (fc1, fc2)}; checks shapes and that every layer in ``layers`` exists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"gates file {path} not found; pass a safetensors file written by `dyvte train-gates`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"gates file {path} is not a readable safetensors file ({exc})") from None
    found: dict[int, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    gates = {}
    for k, ws in sorted(found.items()):
        if set(ws) != {"fc1", "fc2"}:
            raise InputError(f"gates file {path}: layer {k} needs both fc1 and fc2 weights")
        fc1, fc2 = ws["fc1"], ws["fc2"]
        if fc1.ndim != 2 or fc2.ndim != 2 or fc2.shape != (2, fc1.shape[0]) or fc1.shape[1] % 2:
            raise InputError(
                f"gates file {path}: layer {k} has fc1 {tuple(fc1.shape)}, fc2 {tuple(fc2.shape)}; "
                "expected fc1 [h, 2d] and fc2 [2, h]"
            )
        if model_dim is not None and fc1.shape[1] != 2 * model_dim:
            raise InputError(
                f"gates file {path}: layer {k} reads features of size {fc1.shape[1]}, the model needs "
                f"2 x hidden size = {2 * model_dim}; were these gates trained for another model?"
            )
        gates[k] = (fc1, fc2)
    missing = [k for k in (layers or []) if k not in gates]
    if missing:
        raise InputError(
            f"gates file {path} has no gate for candidate layer(s) {missing} (it has {sorted(gates) or 'none'}); "
            "train gates for these layers or export with --candidates among the gated layers"
        )
    return gates


def save_gates(path: str | Path, gates: dict, metadata: dict | None = None) -> None:
    """Write {layer: (fc1, fc2)} in the contract format (atomically)."""
    from safetensors.torch import save

    from dyvte.engines.files import write_atomic

    tensors = {}
    for k, (fc1, fc2) in sorted(gates.items()):
        tensors[f"gate.{k}.fc1.weight"] = fc1.detach().float().contiguous().cpu()
        tensors[f"gate.{k}.fc2.weight"] = fc2.detach().float().contiguous().cpu()
    write_atomic(Path(path), save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))
