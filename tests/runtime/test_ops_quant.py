"""Weight types: porter.runtime.quant against ggml and gguf, and quantized products against float64.

Accuracy contract of ``mul_mat(W, x)`` per weight type, measured as ``dot_rel`` (see ophelpers:
each dot product's error over ``||x_i|| ||w_j||``) against ``dequantize(W) @ x`` in float64, so
the weights' own rounding is not counted, only what the product adds. ggml converts the
activations to the weight type's "vec dot" type first: F16 -> F16, BF16 -> BF16, Q4_0/Q5_0/Q8_0
-> Q8_0 and Q4_1/Q5_1 -> Q8_1 (8-bit blocks of 32), K-quants -> Q8_K (8-bit blocks of 256).
That rounding dominates, and bounds the error (Cauchy-Schwarz) by its relative size:

    F32   1e-5
    F16   5e-4    (unit roundoff 2^-11; worst seen 4.6e-4 at k = 1)
    BF16  4e-3    (unit roundoff 2^-8; worst seen 3.8e-3)
    Q8_0-activation types  1e-2   (worst seen 4.3e-3 over 500 examples each; hard bound 2.5e-2)
    K-quants (Q8_K)        5e-3   (worst seen 1.8e-3; hard bound 6.3e-2)

Round trips ``||dequantize(quantize(x)) - x|| / ||x||`` for normal data: BF16 <= 2^-8 and Q8_0
<= 2.36e-2 (hard bounds; F16 element by element: |error| <= 2^-11 (|x| + 2^-14)), the others about 1.3x the worst seen over 500
examples (Q6_K 2.4e-2, Q5_K 4.2e-2, Q5_0/Q5_1 5.6e-2, Q4_K 8.2e-2, Q4_0/Q4_1 0.118, Q3_K 0.168,
Q2_K 0.343).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ophelpers import check, dot_rel, exact, norm_rel, rng_for, row_norms, run
from porter.errors import ShapeError
from porter.runtime._lib import ffi, lib
from porter.runtime.quant import NonFiniteError, dequantize, iter_quantize, quantize, quantize_into, quantized_nbytes
from porter.runtime.types import GGMLType as T

seeds = st.integers(0, 2**32 - 1)

PRODUCT_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K,
                 T.Q2_K, T.Q3_K, T.Q5_K]
PRODUCT_BOUND = {T.F32: 1e-5, T.F16: 5e-4, T.BF16: 4e-3,
                 T.Q2_K: 5e-3, T.Q3_K: 5e-3, T.Q4_K: 5e-3, T.Q5_K: 5e-3, T.Q6_K: 5e-3}  # others: 1e-2
ROUND_TRIP = {T.F32: 0.0, T.F16: 2.0 ** -11, T.BF16: 2.0 ** -8, T.Q8_0: 2.36e-2, T.Q6_K: 3.2e-2,
              T.Q5_1: 7.5e-2, T.Q5_0: 7.5e-2, T.Q5_K: 5.5e-2, T.Q4_1: 0.155, T.Q4_0: 0.155, T.Q4_K: 0.11,
              T.Q3_K: 0.22, T.Q2_K: 0.45}
GGUF_QUANTIZERS = [T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def row_lengths(gtype: T) -> st.SearchStrategy[int]:
    b = gtype.block_size
    if b == 1:
        return st.integers(1, 300)
    return st.integers(1, 3 if b == 256 else 9).map(lambda n: n * b)


def ggml_quantize(a: np.ndarray, gtype: T) -> bytes:
    out = np.empty(quantized_nbytes(a.shape, gtype), np.uint8)
    rows = np.ascontiguousarray(a.reshape(-1, a.shape[-1]), dtype=np.float32)
    lib.ggml_quantize_chunk(int(gtype), ffi.from_buffer("float[]", rows), ffi.from_buffer(out), 0,
                            rows.shape[0], rows.shape[1], ffi.NULL)
    return out.tobytes()


# -- quantize / dequantize ---------------------------------------------------------------------

@pytest.mark.parametrize("gtype", list(ROUND_TRIP), ids=lambda t: t.name)
@given(data=st.data(), rows=st.integers(1, 6), seed=seeds, mag=st.sampled_from([1e-3, 1.0, 1e3]),
       chunk=st.sampled_from([1, 300, 1 << 20]))
def test_quantize_matches_ggml(gtype, data, rows, seed, mag, chunk):
    n = data.draw(row_lengths(gtype), label="row length")
    rng = rng_for(seed)
    a = (rng.standard_normal((rows, n)) * mag).astype(np.float32)
    a[rng.random(a.shape) < 0.05] = 0.0  # some exact zeros (all-zero blocks too, for short rows)
    q = quantize(a, gtype)
    assert len(q) == quantized_nbytes(a.shape, gtype)
    if gtype not in (T.F32,):
        exact(f"quantize {gtype.name} == ggml_quantize_chunk", np.frombuffer(q, np.uint8),
              np.frombuffer(ggml_quantize(a, gtype), np.uint8))
    if gtype in GGUF_QUANTIZERS:
        g = gguf.quants.quantize(a, gguf.GGMLQuantizationType(int(gtype)))
        exact(f"quantize {gtype.name} == gguf", np.frombuffer(q, np.uint8), g.reshape(-1).view(np.uint8))
    streamed = b"".join(bytes(c) for c in iter_quantize(a, gtype, chunk_elements=chunk))
    exact("iter_quantize == quantize", np.frombuffer(streamed, np.uint8), np.frombuffer(q, np.uint8))
    d = dequantize(q, gtype, a.shape)
    if gtype.block_size > 1 or gtype == T.BF16:  # gguf's numpy dequantizer agrees bit for bit
        gd = gguf.quants.dequantize(np.frombuffer(q, np.uint8).reshape(rows, -1), gguf.GGMLQuantizationType(int(gtype)))
        exact(f"dequantize {gtype.name} == gguf", d, gd.astype(np.float32))
    if gtype == T.F16:  # element by element; below 2^-14 F16 is subnormal (absolute spacing 2^-24)
        err = float((np.abs(d.astype(np.float64) - a) / (np.abs(a.astype(np.float64)) + 2.0 ** -14)).max())
        check("round trip F16", err, ROUND_TRIP[gtype], "elem_rel")
    else:
        check(f"round trip {gtype.name}", norm_rel(d, a), ROUND_TRIP[gtype], "norm_rel")


def test_quantize_streams_in_row_chunks():
    a = rng_for(1).standard_normal((64, 256)).astype(np.float32)
    chunks = list(iter_quantize(a, T.Q4_K, chunk_elements=1000))
    assert len(chunks) == 22  # 3 rows of 256 values per chunk of at most 1000 values: ceil(64 / 3)
    assert all(len(c) % T.Q4_K.row_bytes(256) == 0 for c in chunks[:-1])
    assert b"".join(bytes(c) for c in chunks) == quantize(a, T.Q4_K)
    buf = bytearray(quantized_nbytes(a.shape, T.Q8_0) + 7)
    assert quantize_into(a, T.Q8_0, buf) == len(buf) - 7
    assert bytes(buf[:-7]) == quantize(a, T.Q8_0)
    # a float64 or float16 source is converted chunk by chunk, with the same result
    assert quantize(a.astype(np.float64), T.Q6_K) == quantize(a, T.Q6_K)


@pytest.mark.parametrize("gtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_quantize_rejects_bad_rows(gtype):
    bad = gtype.block_size + 1
    with pytest.raises(ShapeError, match=f"blocks of {gtype.block_size}.*{bad} values"):
        quantize(np.zeros((2, bad), np.float32), gtype)
    with pytest.raises(ShapeError, match="blocks of"):
        dequantize(b"", gtype, (2, bad))
    with pytest.raises(ShapeError, match="bytes"):
        dequantize(b"\0" * 3, gtype, (1, gtype.block_size))
    with pytest.raises(ShapeError, match="floating-point"):
        quantize(np.zeros((2, gtype.block_size), np.int32), gtype)


def test_quantize_rejects_non_finite():
    a = np.ones((3, 64), np.float32)
    a[2, 5] = np.nan
    with pytest.raises(NonFiniteError, match="row 2, column 5"):
        quantize(a, T.Q8_0)
    with pytest.raises(NonFiniteError, match="F16"):
        quantize(np.full((1, 4), 1e5, np.float32), T.F16)
    assert len(quantize(a, T.Q8_0, check_finite=False)) == quantized_nbytes(a.shape, T.Q8_0)


# -- ops on quantized weights ------------------------------------------------------------------

def product_bound(gtype: T) -> float:
    return PRODUCT_BOUND.get(gtype, 1e-2)


@pytest.mark.parametrize("gtype", PRODUCT_TYPES, ids=lambda t: t.name)
@given(data=st.data(), m=st.integers(1, 16), n=st.integers(1, 8), seed=seeds, mag=st.sampled_from([1e-2, 1.0, 1e2]))
def test_mul_mat_weight_types(backend, gtype, data, m, n, seed, mag):
    k = data.draw(row_lengths(gtype) if gtype.block_size > 1 else st.integers(1, 96), label="k")
    rng = rng_for(seed)
    w = (rng.standard_normal((m, k)) * mag).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    q = quantize(w, gtype)
    got = run(backend, lambda g: g.ops.mul_mat(g.raw_input(gtype, [k, m], q), g.input(x)))
    wd = dequantize(q, gtype, w.shape).astype(np.float64)
    ref = x.astype(np.float64) @ wd.T
    err = dot_rel(got.reshape(ref.shape), ref, row_norms(x), row_norms(wd))
    check(f"mul_mat {gtype.name} weights", err, product_bound(gtype), "dot_rel")


@pytest.mark.parametrize("gtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
@given(data=st.data(), n_rows=st.integers(1, 10), n_ids=st.integers(1, 8), seed=seeds)
def test_get_rows_quantized(backend, gtype, data, n_rows, n_ids, seed):
    n = data.draw(row_lengths(gtype), label="row length")
    rng = rng_for(seed)
    table = rng.standard_normal((n_rows, n)).astype(np.float32)
    ids = rng.integers(0, n_rows, n_ids).astype(np.int32)
    q = quantize(table, gtype)
    got = run(backend, lambda g: g.ops.get_rows(g.raw_input(gtype, [n, n_rows], q), g.input(ids)))
    exact(f"get_rows {gtype.name}", got.reshape(n_ids, n), dequantize(q, gtype, table.shape)[ids])


@pytest.mark.parametrize("gtype", [T.Q8_0, T.Q4_0, T.Q4_K], ids=lambda t: t.name)
@given(data=st.data(), m=st.integers(1, 8), n_expert=st.integers(1, 5), n_tokens=st.integers(1, 5), seed=seeds)
def test_mul_mat_id_quantized(backend, gtype, data, m, n_expert, n_tokens, seed):
    k = data.draw(row_lengths(gtype), label="k")
    n_used = data.draw(st.integers(1, n_expert))
    rng = rng_for(seed)
    experts = rng.standard_normal((n_expert, m, k)).astype(np.float32)
    x = rng.standard_normal((n_tokens, n_used, k)).astype(np.float32)
    ids = np.stack([rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    q = quantize(experts, gtype)
    deq = dequantize(q, gtype, experts.shape).astype(np.float64)
    got = run(backend, lambda g: g.ops.mul_mat_id(g.raw_input(gtype, [k, m, n_expert], q), g.input(x), g.input(ids)))
    sel = deq[ids]  # (t, u, m, k)
    ref = np.einsum("tuk,tumk->tum", x.astype(np.float64), sel)
    scale = row_norms(x)[..., None] * row_norms(sel)
    err = float((np.abs(got.reshape(ref.shape) - ref) / scale).max())
    check(f"mul_mat_id {gtype.name} experts", err, product_bound(gtype), "dot_rel")


@pytest.mark.parametrize("gtype", [T.Q8_0, T.Q4_0, T.Q5_1], ids=lambda t: t.name)
@given(rows=st.integers(1, 6), nb=st.integers(1, 4), seed=seeds)
def test_cpy_to_quantized(backend, gtype, rows, nb, seed):
    """ggml's own in-graph quantization (cpy F32 -> Q) writes what porter.quant writes."""
    from porter.runtime.core import GraphRunner

    n = nb * gtype.block_size
    a = rng_for(seed).standard_normal((rows, n)).astype(np.float32)
    with GraphRunner(backend, max_nodes=16) as g:
        dst = g.input(gtype=gtype, shape=(rows, n))
        node = g.ops.cpy(g.input(a), dst)
        lib.ggml_set_output(node)
        graph_out = g.ops.cast(g.ops.get_rows(node, g.input(np.arange(rows, dtype=np.int32))), T.F32)
        (deq,) = g.compute([graph_out])
        raw = np.empty(int(lib.ggml_nbytes(node)), np.uint8)
        lib.ggml_backend_tensor_get(node, ffi.from_buffer(raw), 0, raw.nbytes)
    q = quantize(a, gtype)
    exact(f"cpy F32->{gtype.name} bytes", raw, np.frombuffer(q, np.uint8))
    exact(f"cpy F32->{gtype.name} values", deq.reshape(a.shape), dequantize(q, gtype, a.shape))
