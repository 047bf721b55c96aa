"""Reading a transformers checkpoint's safetensors files one tensor at a time.

The files' headers are parsed up front (names, dtypes, shapes, offsets, checked against the file
sizes, so a truncated download is reported before anything is written); a tensor's bytes are read
only when asked for, with ordinary reads into a fresh numpy buffer. No memory map is kept: pages
of a mapped file that were touched stay in the process's resident set, which would make peak
memory grow with the model rather than with its largest tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from porter.errors import ModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype -> numpy dtype of the stored elements (bfloat16 is read as uint16)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def _parse_header(path: Path) -> dict[str, TensorEntry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path} is truncated (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ModelError(
                    f"{path} is not a valid safetensors file or is truncated (header of {n} bytes, "
                    f"file of {size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not a valid safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a valid safetensors file (header is not an object)")
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: malformed header entry for tensor {name!r}") from exc
        if dtype not in _DTYPES:
            raise ModelError(
                f"{path}: tensor {name!r} has dtype {dtype}, which porter cannot convert "
                f"(supported: {', '.join(_DTYPES)})"
            )
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0 or any(d < 0 for d in shape):
            raise ModelError(f"{path}: tensor {name!r} has inconsistent offsets for its shape {shape}")
        if data_start + end > size:
            raise ModelError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                f"has {size} bytes; download or save the checkpoint again"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, nbytes)
    return entries


def _to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return raw
    if dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)
    return raw.astype(np.float32)


class Checkpoint:
    """The tensors of a checkpoint directory (``model.safetensors`` or a sharded set)."""

    def __init__(self, model_dir: Path | str):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise ModelError(f"{self.model_dir} is not a directory")
        files = self._files()
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            for name, entry in _parse_header(path).items():
                if name in self.entries:
                    raise ModelError(
                        f"tensor {name!r} is stored twice, in {self.entries[name].file.name} and {path.name}"
                    )
                self.entries[name] = entry
        self._check_index()
        self._handles: dict[Path, BinaryIO] = {}

    def _files(self) -> list[Path]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._weight_map = {str(k): str(v) for k, v in weight_map.items()}
            except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{index} is not a valid safetensors index: {exc}") from exc
            names = sorted(set(self._weight_map.values()))
            missing = [n for n in names if not (self.model_dir / n).is_file()]
            if missing:
                raise ModelError(f"{self.model_dir} lacks checkpoint files listed in {INDEX_NAME}: {missing}")
            return [self.model_dir / n for n in names]
        self._weight_map = {}
        if (self.model_dir / SINGLE_NAME).is_file():
            return [self.model_dir / SINGLE_NAME]
        found = sorted(self.model_dir.glob("*.safetensors"))
        if found:
            return found
        if any(self.model_dir.glob("pytorch_model*.bin")):
            raise ModelError(
                f"{self.model_dir} has only PyTorch .bin weights; porter reads safetensors. Re-save "
                "the model with save_pretrained(dir) (transformers writes safetensors by default)"
            )
        raise ModelError(f"{self.model_dir} has no .safetensors weights")

    def _check_index(self) -> None:
        missing = sorted(n for n, f in self._weight_map.items() if n not in self.entries)
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ModelError(f"{INDEX_NAME} lists tensors its files do not contain: {shown}")

    # ------------------------------------------------------------------ access
    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _handle(self, path: Path) -> BinaryIO:
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb", buffering=0)
        return f

    def _read(self, e: TensorEntry, offset: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, dtype=np.uint8)
        f = self._handle(e.file)
        f.seek(offset)
        view = memoryview(out)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ModelError(f"{e.file} is truncated: could not read all of tensor {e.name!r}")
            got += n
        return out.view(_DTYPES[e.dtype])

    def read_raw(self, name: str) -> np.ndarray:
        """The stored elements (bfloat16 as uint16), in a new writable array of the tensor's shape."""
        e = self.entries[name]
        return self._read(e, e.offset, e.nbytes).reshape(e.shape)

    def read_f32(self, name: str) -> np.ndarray:
        """The tensor as a C-contiguous, writable float32 array."""
        return _to_f32(self.read_raw(name), self.entries[name].dtype)

    def read_rows_f32(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the tensor seen as 2-D (all but the last axis flattened), as float32."""
        e = self.entries[name]
        n = e.shape[-1] if e.shape else 1
        item = _DTYPES[e.dtype].itemsize
        return _to_f32(self._read(e, e.offset + start * n * item, (stop - start) * n * item), e.dtype).reshape(
            stop - start, n
        )

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Checkpoint", "TensorEntry"]
