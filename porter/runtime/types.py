"""ggml tensor types porter uses, with their numpy counterparts and block geometry."""

from __future__ import annotations

import enum

import numpy as np

from porter.runtime._lib import lib


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30

    @property
    def block_size(self) -> int:
        return int(lib.ggml_blck_size(self))

    @property
    def type_size(self) -> int:
        """Bytes per block (per element for the plain types)."""
        return int(lib.ggml_type_size(self))

    @property
    def is_quantized(self) -> bool:
        return self not in _PLAIN

    def row_bytes(self, n: int) -> int:
        return int(lib.ggml_row_size(self, n))

    @classmethod
    def parse(cls, name: str) -> "GGMLType":
        try:
            return cls[name.upper()]
        except KeyError:
            known = ", ".join(t.name.lower() for t in cls)
            raise ValueError(f"unknown ggml type {name!r}; known types: {known}") from None


# Types whose elements are stored one by one, and the numpy dtype holding them bit for bit
# (bfloat16 is carried as uint16).
NUMPY_DTYPE = {
    GGMLType.F32: np.dtype(np.float32),
    GGMLType.F16: np.dtype(np.float16),
    GGMLType.BF16: np.dtype(np.uint16),
    GGMLType.I8: np.dtype(np.int8),
    GGMLType.I16: np.dtype(np.int16),
    GGMLType.I32: np.dtype(np.int32),
    GGMLType.I64: np.dtype(np.int64),
    GGMLType.F64: np.dtype(np.float64),
}
_PLAIN = frozenset(NUMPY_DTYPE)
FROM_NUMPY = {
    np.dtype(np.float32): GGMLType.F32,
    np.dtype(np.float16): GGMLType.F16,
    np.dtype(np.int8): GGMLType.I8,
    np.dtype(np.int16): GGMLType.I16,
    np.dtype(np.int32): GGMLType.I32,
    np.dtype(np.int64): GGMLType.I64,
    np.dtype(np.float64): GGMLType.F64,
}
