"""Weights in ggml's storage layouts: quantize float rows into ggml blocks, and back.

Which implementation produces each type (all bit-identical to ggml, which the tests check):

- ``F32``: a plain copy; ``F16``: numpy's round-to-nearest-even conversion (what ggml does);
- ``BF16``, ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``: the ``gguf`` package's numpy
  quantizers (bit-identical to ggml's reference quantizers);
- ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``: ggml's own ``ggml_quantize_chunk`` through
  cffi (``gguf`` only dequantizes these), without an importance matrix.

:func:`dequantize` uses ggml's own ``to_float`` for every type, so what it returns is exactly
what ggml computes with (for example in ``get_rows``).

Everything works on row chunks of at most ``CHUNK_ELEMENTS`` floats, so quantizing a tensor
needs the output plus a few chunk-sized temporaries, never a float copy of the whole tensor:
:func:`iter_quantize` yields the result chunk by chunk (for writing a GGUF file as it goes) and
:func:`quantize_into` fills a caller's buffer. Rows are the last axis of the array, which is
ggml's ``ne[0]`` (a torch ``(out, in)`` weight quantizes along ``in``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from porter.errors import PorterError, ShapeError
from porter.runtime._lib import ffi, lib
from porter.runtime.types import GGMLType

# Floats per chunk (4 MiB of float32 input); at least one row is always taken.
CHUNK_ELEMENTS = 1 << 20

# Types whose gguf quantizer is bit-identical to ggml's reference quantizer.
_GGUF_TYPES = frozenset({GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
                         GGMLType.Q5_0, GGMLType.Q5_1})
# Types quantized by ggml itself.
_GGML_TYPES = frozenset({GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                         GGMLType.IQ4_NL})
SUPPORTED = frozenset({GGMLType.F32, GGMLType.F16}) | _GGUF_TYPES | _GGML_TYPES

_F16_MAX = 65504.0


class NonFiniteError(PorterError, ValueError):
    """A tensor to quantize holds NaN or infinite values (or values F16 cannot represent)."""


def _check_type(gtype) -> GGMLType:
    try:
        gtype = GGMLType(gtype)
    except ValueError:
        raise ShapeError(f"quantize: {gtype!r} is not a ggml type porter knows") from None
    if gtype not in SUPPORTED:
        names = ", ".join(sorted(t.name for t in SUPPORTED))
        raise ShapeError(f"quantize: {gtype.name} is not supported; supported types: {names}")
    return gtype


def _check_row(n_per_row: int, gtype: GGMLType, what: str = "quantize") -> None:
    block = gtype.block_size
    if n_per_row <= 0 or n_per_row % block:
        raise ShapeError(
            f"{what}: {gtype.name} stores rows in blocks of {block} values, but the rows have "
            f"{n_per_row} values (not a multiple of {block}); choose a type whose block size "
            f"divides {n_per_row} (F32, F16 and BF16 fit any row)")


def quantized_nbytes(shape: Sequence[int], gtype) -> int:
    """Bytes that an array of numpy ``shape`` occupies as ggml type ``gtype``."""
    gtype = _check_type(gtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ShapeError("quantize: a scalar has no rows; give at least a 1-d array")
    _check_row(shape[-1], gtype)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    return n_rows * gtype.row_bytes(shape[-1])


def _rows_view(array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0:
        raise ShapeError("quantize: a scalar has no rows; give at least a 1-d array")
    if array.dtype.kind != "f":
        raise ShapeError(f"quantize: expected floating-point values, got numpy {array.dtype}")
    return array.reshape(-1, array.shape[-1])  # a view when the array is contiguous


def _chunk_rows(n_per_row: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, n_per_row))


def _check_values(chunk: np.ndarray, gtype: GGMLType, first_row: int) -> None:
    finite = np.isfinite(chunk)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise NonFiniteError(
            f"quantize: value {chunk[r, c]} at row {first_row + r}, column {c} is not finite; "
            "ggml would silently store garbage. Fix the weights (or pass check_finite=False)")
    if gtype == GGMLType.F16:
        big = np.abs(chunk) > _F16_MAX
        if big.any():
            r, c = np.argwhere(big)[0]
            raise NonFiniteError(
                f"quantize: value {chunk[r, c]} at row {first_row + r}, column {c} exceeds F16's "
                f"range (+-{_F16_MAX:g}) and would become infinite; use BF16 or F32")


def _quantize_chunk(chunk: np.ndarray, gtype: GGMLType, out: np.ndarray) -> None:
    """Quantize float32 rows ``chunk`` (C-contiguous, 2-d) into ``out`` (uint8, exact size)."""
    if gtype == GGMLType.F32:
        out.view(np.float32).reshape(chunk.shape)[...] = chunk
    elif gtype == GGMLType.F16:
        out.view(np.float16).reshape(chunk.shape)[...] = chunk
    elif gtype in _GGUF_TYPES:
        import gguf

        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # only with check_finite=False
            q = gguf.quants.quantize(chunk, gguf.GGMLQuantizationType(int(gtype)))
        out[...] = q.reshape(-1).view(np.uint8)
    else:
        n_rows, n_per_row = chunk.shape
        written = lib.ggml_quantize_chunk(int(gtype), ffi.from_buffer("float[]", chunk),
                                          ffi.from_buffer(out), 0, n_rows, n_per_row, ffi.NULL)
        if written != out.nbytes:  # pragma: no cover - would mean a wrong size computation
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")


_initialized: set[GGMLType] = set()


def _prepare(gtype: GGMLType) -> None:
    if gtype in _GGML_TYPES and gtype not in _initialized:
        lib.ggml_quantize_init(int(gtype))  # builds lookup tables some quantizers need; idempotent
        _initialized.add(gtype)
        if lib.ggml_quantize_requires_imatrix(int(gtype)):  # pragma: no cover - not for K-quants
            raise ShapeError(f"quantize: {gtype.name} needs an importance matrix, which porter does not compute")


def iter_quantize(array, gtype, *, check_finite: bool = True,
                  chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[memoryview]:
    """Quantize ``array`` (rows along its last axis) chunk by chunk, yielding ggml bytes.

    The concatenation of the yielded chunks is ``quantize(array, gtype)``. Each chunk is a fresh
    buffer of whole rows, roughly ``chunk_elements`` input values at a time."""
    gtype = _check_type(gtype)
    rows = _rows_view(array)
    n_rows, n_per_row = rows.shape
    _check_row(n_per_row, gtype)
    _prepare(gtype)
    row_bytes = gtype.row_bytes(n_per_row)
    step = _chunk_rows(n_per_row, chunk_elements)
    for start in range(0, n_rows, step):
        chunk = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        if check_finite:
            _check_values(chunk, gtype, start)
        out = np.empty(chunk.shape[0] * row_bytes, dtype=np.uint8)
        _quantize_chunk(chunk, gtype, out)
        yield memoryview(out)


def quantize_into(array, gtype, out, *, check_finite: bool = True,
                  chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Quantize ``array`` into the writable buffer ``out`` (e.g. a ggml tensor's host memory or
    an ``mmap``); returns the number of bytes written."""
    gtype = _check_type(gtype)
    rows = _rows_view(array)
    n_rows, n_per_row = rows.shape
    _check_row(n_per_row, gtype)
    _prepare(gtype)
    dest = np.frombuffer(out, dtype=np.uint8)
    row_bytes = gtype.row_bytes(n_per_row)
    total = n_rows * row_bytes
    if dest.nbytes < total:
        raise ShapeError(f"quantize: the output buffer holds {dest.nbytes} bytes; {gtype.name} "
                         f"{tuple(np.shape(array))} needs {total}")
    step = _chunk_rows(n_per_row, chunk_elements)
    for start in range(0, n_rows, step):
        chunk = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        if check_finite:
            _check_values(chunk, gtype, start)
        _quantize_chunk(chunk, gtype, dest[start * row_bytes:(start + chunk.shape[0]) * row_bytes])
    return total


def quantize(array, gtype, *, check_finite: bool = True) -> bytes:
    """``array`` (float, rows along the last axis) in ggml's block layout for ``gtype``.

    Raises :class:`ShapeError` when the row length is not a multiple of the type's block size
    and :class:`NonFiniteError` for NaN/Inf values (ggml would store garbage silently)."""
    gtype = _check_type(gtype)
    out = bytearray(quantized_nbytes(np.shape(array), gtype))
    quantize_into(array, gtype, out, check_finite=check_finite)
    return bytes(out)


def dequantize(data, gtype, shape: Sequence[int]) -> np.ndarray:
    """Float32 values of ``data`` (ggml ``gtype`` bytes) as an array of numpy ``shape``.

    Uses ggml's own ``to_float`` for the type, i.e. exactly the values ggml computes with."""
    try:
        gtype = GGMLType(gtype)
    except ValueError:
        raise ShapeError(f"dequantize: {gtype!r} is not a ggml type porter knows") from None
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ShapeError("dequantize: give the numpy shape of the tensor (at least 1-d)")
    _check_row(shape[-1], gtype, "dequantize")
    n = int(np.prod(shape, dtype=np.int64))
    n_rows = n // shape[-1] if shape[-1] else 0
    src = np.frombuffer(data, dtype=np.uint8)
    need = n_rows * gtype.row_bytes(shape[-1])
    if src.nbytes != need:
        raise ShapeError(f"dequantize: {gtype.name} {shape} occupies {need} bytes, got {src.nbytes}")
    out = np.empty(shape, dtype=np.float32)
    if gtype == GGMLType.F32:
        out.reshape(-1)[...] = src.view(np.float32)
        return out
    traits = lib.ggml_get_type_traits(int(gtype))
    if traits.to_float == ffi.NULL:
        raise ShapeError(f"dequantize: ggml has no conversion from {gtype.name} to float")
    if n:
        traits.to_float(ffi.from_buffer(src), ffi.from_buffer("float[]", out), n)
    return out
