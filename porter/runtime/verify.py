"""``porter verify``: every tensor of a GGUF decoded and checked for NaN and infinity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from porter.runtime.gguf_file import GGUFFile
from porter.runtime.types import GGMLType


def tensor_values(reader: GGUFFile, name: str) -> np.ndarray:
    """A tensor's values as float32 (quantized types dequantized by the gguf package)."""
    t = reader.tensors[name]
    raw = np.frombuffer(reader.data(name), dtype=np.uint8)
    if t.type == GGMLType.F32:
        return raw.view(np.float32)
    if t.type == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32)
    if t.type == GGMLType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if t.type in (GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64):
        return np.zeros(0, np.float32)  # integers are always finite
    import gguf.quants

    n_rows = int(np.prod(t.ne[1:])) if len(t.ne) > 1 else 1
    return gguf.quants.dequantize(raw.reshape(n_rows, -1), gguf.GGMLQuantizationType(t.type))


def nonfinite_tensors(path: str | Path) -> list[tuple[str, int]]:
    """(name, count of non-finite values) of every tensor that holds any."""
    bad = []
    with GGUFFile(path) as reader:
        for name, t in reader.tensors.items():
            if t.nbytes < 0:
                bad.append((name, -1))
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                n = int(np.count_nonzero(~np.isfinite(tensor_values(reader, name))))
            if n:
                bad.append((name, n))
    return bad
