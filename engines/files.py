"""Files of an engine folder: atomic writes, checksums, safe relative paths, ONNX weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dyvte.errors import EngineFolderError

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def inside(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root``, refusing absolute paths and escapes (``..``, symlinks)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise EngineFolderError(f"manifest path {rel!r} is not a relative path inside {root}")
    root_r = Path(root).resolve()
    full = (root_r / rel).resolve()
    if full != root_r and root_r not in full.parents:
        raise EngineFolderError(f"manifest path {rel!r} points outside the engine folder {root}; refusing it")
    return full


def save_onnx(model, path: Path) -> list[Path]:
    """Save an ONNX model with all weights in one external file ``<name>.data``.

    Both files are written under temporary names and renamed into place (data first).
    Returns the written paths.
    """
    import onnx

    path = Path(path)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        data_name = path.name + ".data"
        onnx.save_model(
            model,
            tmpdir / path.name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=0,
        )
        written = []
        for name in (data_name, path.name):
            src = tmpdir / name
            if src.exists():
                os.replace(src, path.parent / name)
                written.append(path.parent / name)
        return written[::-1]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class OnnxWeights:
    """The initializers of an ONNX file, read one at a time without unpickling anything.

    ``weights[name]`` reads that tensor (CPU, its stored dtype) from the external data file, so a
    loader holds at most one tensor beyond what it keeps. External data must lie inside the ONNX
    file's folder.
    """

    def __init__(self, onnx_path: Path):
        import onnx

        self.path = Path(onnx_path)
        try:
            model = onnx.load(self.path, load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise EngineFolderError(f"{self.path} is not a readable ONNX file ({exc}); re-export the folder") from None
        self._inits = {init.name: init for init in model.graph.initializer}

    def __contains__(self, name) -> bool:
        return name in self._inits

    def __iter__(self):
        return iter(self._inits)

    def __getitem__(self, name: str):
        import numpy as np
        import onnx
        import torch
        from onnx import numpy_helper

        init = self._inits[name]
        dtype = _ONNX_DTYPES.get(init.data_type)
        if dtype is None:
            raise EngineFolderError(f"{self.path}: initializer {name} has unsupported type {init.data_type}")
        tdt, shape = getattr(torch, dtype), tuple(init.dims)
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            src = inside(self.path.parent, info["location"])
            offset, length = int(info.get("offset", 0)), int(info["length"])
            raw = bytearray(length)  # read straight into the tensor's memory (no second copy)
            with open(src, "rb") as f:
                f.seek(offset)
                got = f.readinto(raw)
            if got != length:
                raise EngineFolderError(f"{src} is truncated (initializer {name}); re-export the folder")
            t = torch.frombuffer(raw, dtype=tdt) if raw else torch.empty(0, dtype=tdt)
            return t.reshape(shape)
        if dtype == "bfloat16":
            raw = np.frombuffer(init.raw_data, dtype=np.uint16).copy()
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(numpy_helper.to_array(init).copy())
