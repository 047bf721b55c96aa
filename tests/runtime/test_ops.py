"""Property tests of the op vocabulary (porter.runtime.ops.Ops) against numpy / torch references.

Shapes are drawn by hypothesis; values come from a numpy generator seeded by hypothesis, so every
example is reproducible. Arrays are numpy-ordered (ggml ``ne`` is the shape reversed).

Accuracy contract checked here (F32 unless stated; measures in ophelpers):
- add, sub, mul, div, relu, sqr, get_rows, layout ops, casts to F16/BF16, set_rows, argsort,
  top_k: bit-exact against numpy float32 (IEEE operations, no rounding beyond the type's).
- scale, rms_norm, norm, soft_max, flash_attn (F32 K/V): relative error <= 1e-5 against
  float64; mul_mat and mul_mat_id F32: dot_rel <= 1e-5 (see ophelpers).
- silu, gelu_erf, gelu_tanh, sigmoid, tanh, exp, sqrt: element-wise error <= 1e-6 relative to
  max(|f(x)|, |x|) (the |x| term admits the unavoidable F32 cancellation of x * Phi(x) for large
  negative x) against torch, in float64 and in float32.
- flash_attn with F16 K/V: <= 5e-3 for up to 24 keys (ggml rounds Q to F16 for the K products
  and accumulates V in F16).
Quantized products and rope have their own files.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ophelpers import check, dot_rel, elem_rel, exact, max_rel, rng_for, row_norms, run
from porter.runtime.ops import ROPE_NEOX  # noqa: F401  (imported to make sure the module loads)
from porter.runtime.types import GGMLType

seeds = st.integers(0, 2**32 - 1)
dim = st.integers(1, 6)
shapes = st.lists(dim, min_size=1, max_size=4).map(tuple)
magnitudes = st.sampled_from([1e-3, 1.0, 1e3])


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tile_to(b: np.ndarray, shape: tuple) -> np.ndarray:
    """ggml's broadcasting: b repeats (tiles) along every dimension it divides."""
    b = b.reshape((1,) * (len(shape) - b.ndim) + b.shape)
    return np.tile(b, [s // t for s, t in zip(shape, b.shape)])


# -- elementwise binary ------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@given(shape=shapes, data=st.data(), seed=seeds, swap=st.booleans(), mag=magnitudes)
def test_binary(backend, shape, data, seed, op, swap, mag):
    rng = rng_for(seed)
    nb = data.draw(st.integers(1, len(shape)), label="b ndim")
    bshape = tuple(data.draw(st.sampled_from(divisors(s))) for s in shape[len(shape) - nb:])
    a = (rng.standard_normal(shape) * mag).astype(np.float32)
    b = rng.standard_normal(bshape).astype(np.float32) * mag
    if op == "div":
        b = np.sign(b + 1e-30) * (np.abs(b) + 0.5 * mag)
    b = b.astype(np.float32)
    swap = swap and op in ("add", "mul")  # commuting ops accept the small operand first

    def build(g):
        ta, tb = g.input(a), g.input(b)
        fn = getattr(g.ops, op)
        return fn(tb, ta) if swap else fn(ta, tb)

    got = run(backend, build)
    bt = tile_to(b, shape)
    ref = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](a, bt)
    exact(f"{op} (tiling broadcast)", got.reshape(shape), ref)


@given(shape=shapes, seed=seeds, s=st.floats(-8, 8, allow_nan=False), bias=st.sampled_from([0.0, 0.5, -3.25]),
       mag=magnitudes)
def test_scale(backend, shape, seed, s, bias, mag):
    a = (rng_for(seed).standard_normal(shape) * mag).astype(np.float32)
    got = run(backend, lambda g: g.ops.scale(g.input(a), s, bias))
    ref = a.astype(np.float64) * np.float64(np.float32(s)) + np.float64(np.float32(bias))
    check("scale", max_rel(got.reshape(shape), ref), 1e-6)


# -- normalization -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["rms_norm", "norm", "l2_norm"])
@given(shape=shapes, seed=seeds, eps=st.sampled_from([0.0, 1e-6, 1e-5]), mag=magnitudes,
       offset=st.sampled_from([0.0, 3.0]))
def test_norms(backend, shape, seed, eps, mag, offset, which):
    shape = shape[:-1] + (shape[-1] * 7,)  # rows of 7..42
    a = ((rng_for(seed).standard_normal(shape) + offset) * mag).astype(np.float32)
    got = run(backend, lambda g: getattr(g.ops, which)(g.input(a), eps))
    x = a.astype(np.float64)
    if which == "rms_norm":
        ref = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    elif which == "l2_norm":  # ggml: x / max(||x||, eps)
        ref = x / np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), eps)
    else:
        c = x - x.mean(-1, keepdims=True)
        ref = c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)
    check(which, max_rel(got.reshape(shape), ref), 1e-5)
    if which == "rms_norm":  # and against transformers' float32 module (LlamaRMSNorm without weight)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        m = LlamaRMSNorm(shape[-1], eps=eps)
        with torch.no_grad():
            hf = m(torch.from_numpy(a)).numpy()
        check("rms_norm vs transformers fp32", max_rel(got.reshape(shape), hf), 1e-5)


# -- unary -------------------------------------------------------------------------------------

_T64 = {
    "silu": torch.nn.functional.silu,
    "gelu_erf": lambda x: torch.nn.functional.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "sqr": torch.square,
    "sqrt": torch.sqrt,
    "relu2": lambda x: torch.square(torch.relu(x)),
}
_EXACT_UNARY = {"relu", "sqr", "relu2"}


@pytest.mark.parametrize("op", sorted(_T64))
@given(shape=shapes, seed=seeds, span=st.sampled_from([1.0, 4.0, 12.0]))
def test_unary(backend, shape, seed, op, span):
    rng = rng_for(seed)
    a = (rng.uniform(-span, span, shape)).astype(np.float32)
    if op == "sqrt":
        a = np.abs(a)
    if op == "exp":
        a = np.clip(a, -80, 80)
    got = run(backend, lambda g: getattr(g.ops, op)(g.input(a))).reshape(shape)
    t32 = _T64[op](torch.from_numpy(a)).numpy()
    if op in _EXACT_UNARY:
        exact(op, got, t32)
        return
    t64 = _T64[op](torch.from_numpy(a.astype(np.float64))).numpy()
    # F32 evaluation of x * Phi(x) and the like cancels for large negative x: absolute errors of
    # a few ulps of x are unavoidable there, so the floor scales with |x| (exp: purely relative).
    floor = 0.0 if op == "exp" else np.abs(a).astype(np.float64) + 1e-30
    check(f"{op} vs torch fp64", elem_rel(got, t64, floor), 1e-6, "elem_rel")
    check(f"{op} vs torch fp32", elem_rel(got, t32, floor), 1e-6, "elem_rel")


@given(shape=shapes, seed=seeds, cap=st.sampled_from([5.0, 30.0, 50.0]))
def test_softcap(backend, shape, seed, cap):
    a = (rng_for(seed).standard_normal(shape) * cap).astype(np.float32)
    got = run(backend, lambda g: g.ops.softcap(g.input(a), cap)).reshape(shape)
    ref = cap * np.tanh(a.astype(np.float64) / cap)
    check("softcap", max_rel(got, ref), 1e-6)


@given(shape=shapes, seed=seeds, lo=st.sampled_from([-8.0, -1.5, 0.0, 0.25]), width=st.sampled_from([0.0, 0.5, 3.0]),
       mag=magnitudes)
def test_clamp(backend, shape, seed, lo, width, mag):
    """Bit-exact against numpy, and the clamped tensor's other readers still see it unclamped
    (ggml_clamp by itself writes into its input)."""
    a = (rng_for(seed).standard_normal(shape) * mag * 4).astype(np.float32)
    hi = lo + width

    def build(g):
        x = g.ops.scale(g.input(a), 1.0)  # a computed node, as in a graph (inputs are not reused)
        return [g.ops.clamp(x, lo, hi), g.ops.add(x, x)]

    got, doubled = run(backend, build)
    exact("clamp", got.reshape(shape), np.clip(a, np.float32(lo), np.float32(hi)))
    exact("clamp leaves its input alone", doubled.reshape(shape), a + a)


def test_clamp_refuses_an_empty_range(backend):
    from porter.errors import ShapeError

    with pytest.raises(ShapeError, match="min 1.0 is above max -1.0"):
        run(backend, lambda g: g.ops.clamp(g.input(np.zeros(4, np.float32)), 1.0, -1.0))


# -- layout ------------------------------------------------------------------------------------

def _ggml_order(a: np.ndarray) -> np.ndarray:
    """A 4-d numpy array indexed in ggml order (axis i = ne[i])."""
    return a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(3, 2, 1, 0)


def _numpy_order(g: np.ndarray) -> np.ndarray:
    return g.transpose(3, 2, 1, 0)


def _squeeze4(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[-4:]) if a.ndim >= 4 else a.reshape((1,) * (4 - a.ndim) + a.shape)


@given(shape=shapes, seed=seeds, perm=st.permutations(range(4)))
def test_permute_cont(backend, shape, seed, perm):
    a = rng_for(seed).standard_normal(shape).astype(np.float32)
    got = run(backend, lambda g: g.ops.cont(g.ops.permute(g.input(a), perm)))
    inv = [perm.index(d) for d in range(4)]  # result dim d comes from source dim inv[d]
    ref = _numpy_order(np.transpose(_ggml_order(a), inv))
    exact("permute+cont", _squeeze4(got), np.ascontiguousarray(ref))


@given(shape=st.lists(dim, min_size=2, max_size=4).map(tuple), seed=seeds)
def test_transpose_cont(backend, shape, seed):
    a = rng_for(seed).standard_normal(shape).astype(np.float32)
    got = run(backend, lambda g: g.ops.cont(g.ops.transpose(g.input(a))))
    exact("transpose+cont", got.reshape(shape[:-2] + shape[-1:] + shape[-2:-1]), np.swapaxes(a, -1, -2))


@given(shape=shapes, seed=seeds, data=st.data())
def test_reshape(backend, shape, seed, data):
    a = rng_for(seed).standard_normal(shape).astype(np.float32)
    n = a.size
    new = []
    rest = n
    for _ in range(data.draw(st.integers(0, 3))):
        d = data.draw(st.sampled_from(divisors(rest)))
        new.append(d)
        rest //= d
    new.append(rest)
    ne = list(reversed(new))
    got = run(backend, lambda g: g.ops.cont(g.ops.reshape(g.input(a), ne)))
    exact("reshape", got.reshape(-1), a.reshape(-1))
    assert got.size == n


@given(shape=st.lists(st.integers(1, 8), min_size=2, max_size=3).map(tuple), seed=seeds, data=st.data())
def test_view(backend, shape, seed, data):
    a = rng_for(seed).standard_normal(shape).astype(np.float32)
    g4 = _ggml_order(a)  # ne order
    ne_src = g4.shape
    start = [data.draw(st.integers(0, n - 1)) for n in ne_src]
    ne = [data.draw(st.integers(1, n - s)) for n, s in zip(ne_src, start)]
    nb_src = [4, 4 * ne_src[0], 4 * ne_src[0] * ne_src[1], 4 * ne_src[0] * ne_src[1] * ne_src[2]]
    offset = sum(s * b for s, b in zip(start, nb_src))
    got = run(backend, lambda g: g.ops.cont(g.ops.view(g.input(a), ne, nb_src[1:], offset)))
    ref = g4[start[0]:start[0] + ne[0], start[1]:start[1] + ne[1], start[2]:start[2] + ne[2], start[3]:start[3] + ne[3]]
    exact("view+cont", _squeeze4(got), np.ascontiguousarray(_numpy_order(ref)))


@given(shape=shapes, seed=seeds, data=st.data(), gtype=st.sampled_from(["F32", "F16", "I32"]))
def test_concat(backend, shape, seed, data, gtype):
    rng = rng_for(seed)
    d = data.draw(st.integers(0, 3), label="ggml dim")
    a4 = (1,) * (4 - len(shape)) + shape
    bshape = list(a4)
    bshape[3 - d] = data.draw(st.integers(1, 5))
    dtype = {"F32": np.float32, "F16": np.float16, "I32": np.int32}[gtype]
    a = (rng.standard_normal(a4) * 100).astype(dtype)
    b = (rng.standard_normal(bshape) * 100).astype(dtype)
    got = run(backend, lambda g: g.ops.concat(g.input(a), g.input(b), d))
    exact("concat", _squeeze4(got), np.concatenate([a, b], axis=3 - d))


@given(shape=shapes, seed=seeds, mag=magnitudes)
def test_cast_and_cpy(backend, shape, seed, mag):
    a = (rng_for(seed).standard_normal(shape) * mag).astype(np.float32)
    from porter.runtime.quant import quantize

    bf16_bits = np.frombuffer(quantize(a.reshape(-1), GGMLType.BF16), dtype=np.uint16)

    def build(g):
        x = g.input(a)
        f16 = g.ops.cast(x, GGMLType.F16)
        back = g.ops.cast(f16, GGMLType.F32)
        bf16 = g.ops.cast(x, GGMLType.BF16)
        dst = g.input(gtype=GGMLType.F16, shape=a.shape)
        cp = g.ops.cpy(x, dst)
        return [f16, back, bf16, cp]

    f16, back, bf16, cp = run(backend, build)
    exact("cast F32->F16", f16.reshape(shape), a.astype(np.float16))
    exact("cast F16->F32", back.reshape(shape), a.astype(np.float16).astype(np.float32))
    exact("cast F32->BF16 (round to nearest even)", bf16.reshape(-1), bf16_bits)
    exact("cpy F32->F16", cp.reshape(shape), a.astype(np.float16))


# -- lookups -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gtype", ["F32", "F16", "BF16", "I32"])
@given(n_rows=st.integers(1, 12), n_embd=st.integers(1, 40), n_ids=st.integers(1, 10), batch=st.integers(1, 3),
       seed=seeds)
def test_get_rows(backend, n_rows, n_embd, n_ids, batch, seed, gtype):
    rng = rng_for(seed)
    table = rng.standard_normal((batch, n_rows, n_embd)).astype(np.float32)
    ids = rng.integers(0, n_rows, (batch, n_ids)).astype(np.int32)
    if gtype == "F16":
        table = table.astype(np.float16)
    elif gtype == "I32":
        table = (table * 1000).astype(np.int32)

    def build(g):
        if gtype == "BF16":
            from porter.runtime.quant import quantize

            t = g.raw_input(GGMLType.BF16, [n_embd, n_rows, batch], quantize(table, GGMLType.BF16))
        else:
            t = g.input(table)
        return g.ops.get_rows(t, g.input(ids))

    got = run(backend, build)
    if gtype == "BF16":
        from porter.runtime.quant import dequantize, quantize

        table = dequantize(quantize(table, GGMLType.BF16), GGMLType.BF16, table.shape)
    ref = np.stack([table[i][ids[i]] for i in range(batch)])
    if gtype in ("F16", "BF16"):
        ref = ref.astype(np.float32)
    exact(f"get_rows {gtype}", got.reshape(ref.shape), ref)


@given(n_rows=st.integers(1, 12), n_embd=st.integers(1, 40), seed=seeds, data=st.data(),
       dst_type=st.sampled_from(["F32", "F16"]), idx_type=st.sampled_from(["I32", "I64"]))
def test_set_rows(backend, n_rows, n_embd, seed, data, dst_type, idx_type):
    rng = rng_for(seed)
    n_src = data.draw(st.integers(1, n_rows))
    rows = rng.permutation(n_rows)[:n_src].astype(np.int32 if idx_type == "I32" else np.int64)
    dst = rng.standard_normal((n_rows, n_embd)).astype(np.float32 if dst_type == "F32" else np.float16)
    src = rng.standard_normal((n_src, n_embd)).astype(np.float32)
    got = run(backend, lambda g: g.ops.set_rows(g.input(dst), g.input(src), g.input(rows)))
    ref = dst.copy()
    ref[rows] = src.astype(ref.dtype)
    exact(f"set_rows {dst_type}", got.reshape(ref.shape), ref)


# -- products ----------------------------------------------------------------------------------

@given(m=st.integers(1, 24), k=st.integers(1, 64), n=st.integers(1, 9), wb=st.integers(1, 3), rep=st.integers(1, 3),
       seed=seeds, mag=magnitudes)
def test_mul_mat_f32(backend, m, k, n, wb, rep, seed, mag):
    """x @ W.T with W (wb, m, k) broadcast over x (wb*rep, n, k): W batch i serves x batches i*rep..."""
    rng = rng_for(seed)
    w = (rng.standard_normal((wb, m, k)) * mag).astype(np.float32)
    x = rng.standard_normal((wb * rep, n, k)).astype(np.float32)
    got = run(backend, lambda g: g.ops.mul_mat(g.input(w), g.input(x)))
    wr = np.repeat(w, rep, axis=0).astype(np.float64)
    ref = x.astype(np.float64) @ wr.transpose(0, 2, 1)
    check("mul_mat F32", dot_rel(got.reshape(ref.shape), ref, row_norms(x), row_norms(wr)), 1e-5, "dot_rel")


@given(k=st.integers(1, 48), m=st.integers(1, 12), n_expert=st.integers(1, 6), n_tokens=st.integers(1, 6),
       data=st.data(), seed=seeds, shared_x=st.booleans())
def test_mul_mat_id_f32(backend, k, m, n_expert, n_tokens, data, seed, shared_x):
    rng = rng_for(seed)
    n_used = data.draw(st.integers(1, n_expert))
    experts = rng.standard_normal((n_expert, m, k)).astype(np.float32)
    x = rng.standard_normal((n_tokens, 1 if shared_x else n_used, k)).astype(np.float32)
    ids = np.stack([rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]).astype(np.int32)
    got = run(backend, lambda g: g.ops.mul_mat_id(g.input(experts), g.input(x), g.input(ids)))
    ref = np.empty((n_tokens, n_used, m))
    err = 0.0
    for t in range(n_tokens):
        for u in range(n_used):
            w, xv = experts[ids[t, u]].astype(np.float64), x[t, 0 if shared_x else u].astype(np.float64)
            ref[t, u] = w @ xv
            got_tu = got.reshape(ref.shape)[t, u][None]
            err = max(err, dot_rel(got_tu, ref[t, u][None], row_norms(xv)[None], row_norms(w)))
    check("mul_mat_id F32", err, 1e-5, "dot_rel")


# -- softmax and attention ---------------------------------------------------------------------

def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """ALiBi slopes; for max_bias 8 these are transformers' (BLOOM's build_alibi_tensor)."""
    if max_bias == 8.0:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float64)
        return alibi[:, 0, 1].numpy()
    n_log2 = 2 ** math.floor(math.log2(n_head))
    m0, m1 = 2.0 ** (-max_bias / n_log2), 2.0 ** (-max_bias / 2 / n_log2)
    return np.array([m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1) for h in range(n_head)])


def random_mask(rng, n_q: int, n_kv: int, kind: str) -> np.ndarray:
    """Additive mask (n_q, n_kv) with at least one finite entry per row."""
    if kind == "none":
        return np.zeros((n_q, n_kv))
    if kind == "causal":  # queries are the last n_q of n_kv positions
        i = np.arange(n_q)[:, None] + (n_kv - n_q)
        return np.where(np.arange(n_kv)[None, :] <= i, 0.0, -np.inf)
    if kind == "alibi":  # -|i - j| distances with causal -inf, as llama.cpp builds ALiBi masks
        i = np.arange(n_q)[:, None] + (n_kv - n_q)
        j = np.arange(n_kv)[None, :]
        return np.where(j <= i, -np.abs(i - j).astype(np.float64), -np.inf)
    m = np.where(rng.random((n_q, n_kv)) < 0.3, -np.inf, rng.standard_normal((n_q, n_kv)))
    m[np.arange(n_q), rng.integers(0, n_kv, n_q)] = 0.0
    return m


@pytest.mark.parametrize("mask_kind", ["none", "causal", "random", "alibi"])
@given(n_kv=st.integers(1, 40), n_q=st.integers(1, 8), n_head=st.integers(1, 6), seed=seeds, mask_f16=st.booleans(),
       scale=st.sampled_from([1.0, 0.125, 3.0]), max_bias=st.sampled_from([0.0, 8.0, 3.0]),
       head_mask=st.booleans())
def test_soft_max(backend, n_kv, n_q, n_head, seed, mask_kind, mask_f16, scale, max_bias, head_mask):
    rng = rng_for(seed)
    n_q = min(n_q, n_kv)
    a = (rng.standard_normal((n_head, n_q, n_kv)) * 3).astype(np.float32)
    if mask_kind == "none" and max_bias == 0.0:
        mask = None
    else:
        heads = n_head if head_mask and mask_kind == "random" else 1
        mask = np.stack([random_mask(rng, n_q, n_kv, mask_kind) for _ in range(heads)])
        mask = mask.astype(np.float16 if mask_f16 else np.float32)
    mb = max_bias if mask is not None else 0.0
    got = run(backend, lambda g: g.ops.soft_max(g.input(a), None if mask is None else g.input(mask), scale, mb))
    logits = a.astype(np.float64) * np.float32(scale)
    if mask is not None:
        slopes = alibi_slopes(n_head, mb) if mb > 0 else np.ones(n_head)
        logits = logits + slopes[:, None, None] * mask.astype(np.float64)
    ref = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    check("soft_max" + (" ALiBi" if mb > 0 else ""), max_rel(got.reshape(ref.shape), ref), 1e-5)


@given(d=st.sampled_from([4, 8, 16, 32]), dv=st.sampled_from([None, 8]), n_q=st.integers(1, 6), n_kv=st.integers(1, 24),
       n_head_kv=st.integers(1, 3), gqa=st.integers(1, 3), batch=st.integers(1, 2), seed=seeds,
       mask_kind=st.sampled_from(["none", "causal", "random", "alibi"]), softcap=st.sampled_from([0.0, 0.0, 20.0]),
       max_bias=st.sampled_from([0.0, 0.0, 8.0]))
@pytest.mark.parametrize("kv_f16", [False, True], ids=["F32 KV", "F16 KV"])
def test_flash_attn(backend, d, dv, n_q, n_kv, n_head_kv, gqa, batch, seed, mask_kind, softcap, max_bias, kv_f16):
    rng = rng_for(seed)
    dv = dv or d
    n_q = min(n_q, n_kv)
    n_head = n_head_kv * gqa
    scale = 1.0 / math.sqrt(d)
    q = rng.standard_normal((batch, n_head, n_q, d)).astype(np.float32)  # numpy order of ne [d, n_q, h, b]
    k = rng.standard_normal((batch, n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((batch, n_head_kv, n_kv, dv)).astype(np.float32)
    if kv_f16:
        k, v = k.astype(np.float16), v.astype(np.float16)
    mask = None
    if mask_kind != "none" or max_bias > 0:
        mask = random_mask(rng, n_q, n_kv, "alibi" if max_bias > 0 else mask_kind).astype(np.float16)[None, None]
    mb = max_bias if mask is not None else 0.0

    def build(g):
        return g.ops.flash_attn(g.input(q), g.input(k), g.input(v), None if mask is None else g.input(mask),
                                scale=scale, max_bias=mb, softcap=softcap)

    got = run(backend, build)  # ne [dv, n_head, n_q, b] -> numpy (b, n_q, n_head, dv)
    # reference: transformers-style eager attention in float64 (repeat_kv for GQA)
    tq = torch.from_numpy(q.astype(np.float64))
    tk = torch.from_numpy(k.astype(np.float64)).repeat_interleave(gqa, dim=1)
    tv = torch.from_numpy(v.astype(np.float64)).repeat_interleave(gqa, dim=1)
    s = tq @ tk.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        slopes = alibi_slopes(n_head, mb) if mb > 0 else np.ones(n_head)
        s = s + torch.from_numpy(slopes)[None, :, None, None] * torch.from_numpy(mask.astype(np.float64))
    ref = (torch.softmax(s, dim=-1) @ tv).permute(0, 2, 1, 3).numpy()
    name = "flash_attn " + ("F16 K/V" if kv_f16 else "F32 K/V")
    check(name, max_rel(got.reshape(ref.shape), ref), 5e-3 if kv_f16 else 1e-5)


# -- sorting -----------------------------------------------------------------------------------

@given(rows=st.integers(1, 5), n=st.integers(1, 70), seed=seeds, descending=st.booleans(), ties=st.booleans())
def test_argsort(backend, rows, n, seed, descending, ties):
    rng = rng_for(seed)
    a = (rng.integers(0, 4, (rows, n)) if ties else rng.permutation(rows * n).reshape(rows, n)).astype(np.float32)
    got = run(backend, lambda g: g.ops.argsort(g.input(a), descending)).reshape(rows, n)
    assert got.dtype == np.int32
    for r in range(rows):  # a permutation that sorts the row
        assert sorted(got[r].tolist()) == list(range(n))
        vals = a[r][got[r]]
        assert np.all(np.diff(vals) <= 0) if descending else np.all(np.diff(vals) >= 0)
    if not ties:
        ref = np.argsort(-a if descending else a, axis=-1, kind="stable").astype(np.int32)
        exact("argsort", got, ref)


@given(rows=st.integers(1, 5), n=st.integers(1, 70), seed=seeds, data=st.data())
def test_top_k(backend, rows, n, seed, data):
    k = data.draw(st.integers(1, n))
    a = rng_for(seed).permutation(rows * n).reshape(rows, n).astype(np.float32)
    got = run(backend, lambda g: g.ops.top_k(g.input(a), k)).reshape(rows, k)
    exact("top_k", got, np.argsort(-a, axis=-1, kind="stable")[:, :k].astype(np.int32))


def test_sum_rows(backend):
    a = rng_for(7).standard_normal((3, 5, 37)).astype(np.float32)
    got = run(backend, lambda g: g.ops.sum_rows(g.input(a)))
    check("sum_rows", max_rel(got.reshape(3, 5), a.astype(np.float64).sum(-1)), 1e-5)


def test_reference_helpers_can_fail():
    """The measures used above do detect errors (no tautologies)."""
    ref = np.array([1.0, -2.0, 3.0])
    assert max_rel(ref * (1 + 1e-4), ref) > 1e-5
    assert elem_rel(ref + 1e-5, ref, 1e-6) > 1e-6
    with pytest.raises(AssertionError):
        exact("self-test", np.float32([1, 2]), np.float32([1, 3]))
    with pytest.raises(AssertionError):
        check("self-test", float("nan"), 1.0)
    from ophelpers import WORST

    WORST.pop("self-test", None)
    # the tiling reference differs from numpy-style broadcasting on a non-1 divisor
    b = np.arange(2.0)
    assert not np.array_equal(tile_to(b, (4,)), np.repeat(b, 2))


@pytest.mark.parametrize("op", ["rms_norm", "norm", "l2_norm"])
def test_norms_refuse_a_nan_epsilon(backend, op):
    """ggml asserts on a NaN epsilon (the process aborts): refused in Python first."""
    from porter.errors import ShapeError
    from porter.runtime.core import GraphRunner

    with GraphRunner(backend, max_nodes=8) as g:
        with pytest.raises(ShapeError, match=f"{op}: epsilon must be a non-negative number"):
            getattr(g.ops, op)(g.input(np.ones((2, 4), np.float32)), float("nan"))
