"""Property tests of the ops the traced (torch.export) path added to the vocabulary, against
numpy / torch references.

Shapes are drawn by hypothesis; values come from a numpy generator seeded by hypothesis, so every
example is reproducible. Arrays are numpy-ordered (ggml ``ne`` is the shape reversed); the layout
ops take a ggml dimension, so their references index a 4-d array in ggml order.

Accuracy contract checked here (F32; measures in ophelpers):
- neg, abs, step, recip (``1 / a``: IEEE division), clamp, fill, window (``slice``: any ggml
  dimension, any step, of contiguous, permuted and windowed sources, F32/F16/I32), repeat, pad:
  bit-exact against numpy float32 (they move, select or divide values, nothing else).
- cumsum along ne[0]: bit-exact against numpy's float32 cumsum (both add sequentially), and
  within ``(n - 1) * 2**-24`` of the float64 running sum relative to the running sum of ``|x|``
  (the bound of sequential summation for a row of n).
- cos, sin, log (of positive values), elu: element-wise relative error <= 1e-6 against torch in
  float64 and float32 (libm's correctly rounded functions: measured ~6e-8).
- softplus, gelu_quick: element-wise error <= 1e-6 relative to max(|f(x)|, |x|), as for the unary
  functions of test_ops.py. ggml's softplus is ``log(1 + exp(x))`` (torch uses log1p), so below
  x ~ -8, where softplus(x) < 3e-4, only its absolute error stays small (~6e-8); gelu_quick is
  composed from F32 ops (ggml_gelu_quick reads an fp16 table and errs ~4e-3).
- clamp works on a copy: the input, also a graph output, is unchanged. (Not covered: ggml's
  clamp turns NaN into max, where torch keeps NaN.)
- window refuses a step along ne[0] unless it takes every step-th element of whole rows (a row
  divisible by the step, start below it); out-of-range windows, non-multiple repeats and
  negative pads are ShapeErrors (their subprocess cases are in test_no_crash.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ophelpers import check, elem_rel, exact, rng_for, run
from porter.errors import ShapeError
from porter.runtime.core import GraphRunner

seeds = st.integers(0, 2**32 - 1)
dim = st.integers(1, 6)
shapes = st.lists(dim, min_size=1, max_size=4).map(tuple)
magnitudes = st.sampled_from([1e-3, 1.0, 1e3])
ggml_dims = st.integers(0, 3)
# Sources of the layout ops (a parameter, so each gets every example): a contiguous input, a
# permuted view whose ne[0] comes from another source dimension (its elements not adjacent), one
# that keeps ne[0] (rows dense, the rest permuted), and a window of a larger input.
SOURCES = ["contiguous", "permuted", "permuted rows", "window"]
DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32}


def _ggml_order(a: np.ndarray) -> np.ndarray:
    """A 4-d numpy array indexed in ggml order (axis i = ne[i])."""
    return a.reshape((1,) * (4 - a.ndim) + a.shape).transpose(3, 2, 1, 0)


def _from_ggml(g4: np.ndarray) -> np.ndarray:
    """The 4-d numpy-order array of a ggml-order one (what ophelpers.run returns, unsqueezed)."""
    return np.ascontiguousarray(g4.transpose(3, 2, 1, 0))


def _squeeze4(a: np.ndarray) -> np.ndarray:
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def make_source(g, kind: str, ne: list[int], rng, dtype, data) -> tuple[object, np.ndarray]:
    """A tensor of ggml shape ``ne`` built as ``kind``, and its values as a ggml-order array."""
    def values(shape):
        return (rng.standard_normal(shape) * 100).astype(dtype)

    if kind == "contiguous":
        v = values(tuple(reversed(ne)))
        return g.input(v), _ggml_order(v)
    if kind.startswith("permuted"):  # source dim i moves to axes[i]: the source has ne[axes[i]] along dim i
        if kind == "permuted":
            # source dim 0 (of size >= 2 when possible) moves up, so ne[0] strides over it
            wide = [p for p in (1, 2, 3) if ne[p] > 1] or [1, 2, 3]
            first = data.draw(st.sampled_from(wide), label="where source dim 0 goes")
            axes = [first] + data.draw(st.permutations([p for p in range(4) if p != first]), label="other axes")
        else:
            axes = [0] + data.draw(st.permutations([1, 2, 3]), label="permute axes 1..3")
        src = values(tuple(reversed([ne[axes[i]] for i in range(4)])))
        inv = [axes.index(d) for d in range(4)]
        return g.ops.permute(g.input(src), axes), np.transpose(_ggml_order(src), inv)
    # a view of a larger input: along ne[0] a window of longer rows, along another dimension
    # every other element
    d = data.draw(ggml_dims, label="source window dim")
    step = 1 if d == 0 else 2
    big = list(ne)
    big[d] = ne[d] + 2 if d == 0 else 2 * ne[d] + 1
    src = values(tuple(reversed(big)))
    sel = [slice(None)] * 4
    sel[d] = slice(1, 1 + (ne[d] - 1) * step + 1, step)
    return g.ops.window(g.input(src), d, 1, ne[d], step), _ggml_order(src)[tuple(sel)]


# -- unary ---------------------------------------------------------------------------------------

def _quick_gelu(x):
    """transformers' QuickGELUActivation.forward (activations.py), without importing transformers
    (11 s here)."""
    return x * torch.sigmoid(1.702 * x)


_T = {
    "neg": torch.neg,
    "abs": torch.abs,
    "step": lambda x: (x > 0).to(x.dtype),
    "cos": torch.cos,
    "sin": torch.sin,
    "log": torch.log,
    "elu": torch.nn.functional.elu,
    "softplus": torch.nn.functional.softplus,
    "gelu_quick": _quick_gelu,
}
_EXACT = {"neg", "abs", "step"}
_RELATIVE = {"cos", "sin", "log", "elu"}  # floor 0: purely relative


@pytest.mark.parametrize("op", sorted(_T))
@given(shape=shapes, seed=seeds, span=st.sampled_from([1.0, 4.0, 12.0, 30.0]))
def test_unary(backend, shape, seed, op, span):
    rng = rng_for(seed)
    a = rng.uniform(-span, span, shape)
    if op == "log":  # positive values over many orders of magnitude
        a = np.exp(a)
    elif op in _EXACT:
        a[rng.random(shape) < 0.2] = 0.0  # step's edge, and signed zeros for neg/abs
    a = a.astype(np.float32)
    got = run(backend, lambda g: getattr(g.ops, op)(g.input(a))).reshape(shape)
    t32 = _T[op](torch.from_numpy(a)).numpy()
    if op in _EXACT:
        exact(op, got, t32)
        return
    t64 = _T[op](torch.from_numpy(a.astype(np.float64))).numpy()
    floor = 0.0 if op in _RELATIVE else np.abs(a).astype(np.float64) + 1e-30
    check(f"{op} vs torch fp64", elem_rel(got, t64, floor), 1e-6, "elem_rel")
    check(f"{op} vs torch fp32", elem_rel(got, t32, floor), 1e-6, "elem_rel")


@given(shape=shapes, seed=seeds, mag=magnitudes, strided=st.booleans())
def test_recip(backend, shape, seed, mag, strided):
    """1 / a for |a| >= 0.1 mag, of an input or of a window of longer rows (fill copies it)."""
    rng = rng_for(seed)
    big = shape[:-1] + (shape[-1] + 2,) if strided else shape
    a = (np.where(rng.random(big) < 0.5, -1, 1) * rng.uniform(0.1, 10, big) * mag).astype(np.float32)

    def build(g):
        x = g.input(a)
        return g.ops.recip(g.ops.window(x, 0, 1, shape[-1]) if strided else x)

    got = run(backend, build)
    x = a[..., 1:-1] if strided else a
    exact("recip", got.reshape(shape), np.float32(1) / x)
    # and within rounding of the float64 reciprocal (a wrong but exact-looking reference would not be)
    check("recip vs fp64", elem_rel(got.reshape(shape), 1 / x.astype(np.float64), 0.0), 2**-24, "elem_rel")


# -- clamp, fill, cumsum -------------------------------------------------------------------------

bounds = st.sampled_from([-np.inf, -3.0, -1.0, -0.25, 0.0, 0.5, 2.0, 3.0, np.inf])


@given(shape=shapes, seed=seeds, b1=bounds, b2=bounds, mag=magnitudes, strided=st.booleans())
def test_clamp(backend, shape, seed, b1, b2, mag, strided):
    """Bounds below, inside, above the values or infinite (lo == hi included); the input, a graph
    output too, keeps its values (ggml_clamp works in place; the wrapper clamps a copy)."""
    lo, hi = sorted((b1 * mag, b2 * mag))
    rng = rng_for(seed)
    big = shape[:-1] + (shape[-1] + 2,) if strided else shape
    a = (rng.standard_normal(big) * 2 * mag).astype(np.float32)

    def build(g):
        x = g.input(a)
        src = g.ops.window(x, 0, 1, shape[-1]) if strided else x
        return [x, g.ops.clamp(src, lo, hi)]

    x_out, got = run(backend, build)
    src = a[..., 1:-1] if strided else a
    exact("clamp", got.reshape(shape), np.clip(src, np.float32(lo), np.float32(hi)))
    exact("clamp leaves its input unchanged", x_out.reshape(big), a)


@pytest.mark.parametrize("kind", SOURCES)
@given(shape=shapes, seed=seeds, data=st.data(),
       value=st.floats(allow_nan=False, allow_infinity=True, width=32) | st.sampled_from([0.0, -0.0, 1.0]))
def test_fill(backend, shape, seed, data, value, kind):
    """A tensor of the source's shape holding ``value`` (sources of any layout)."""
    ne = list(reversed(shape)) + [1] * (4 - len(shape))

    def build(g):
        src, _ = make_source(g, kind, ne, rng_for(seed), np.float32, data)
        return g.ops.fill(src, value)

    got = _squeeze4(run(backend, build))
    ref = np.full(tuple(reversed(ne)), np.float32(value))
    exact("fill", got, ref)
    assert np.array_equal(np.signbit(got), np.signbit(ref))  # -0.0 stays -0.0


@given(shape=shapes, seed=seeds, mag=magnitudes, offset=st.sampled_from([0.0, 3.0]), rows=st.integers(1, 7))
def test_cumsum(backend, shape, seed, mag, offset, rows):
    shape = shape[:-1] + (shape[-1] * rows,)  # rows of 1..42
    a = ((rng_for(seed).standard_normal(shape) + offset) * mag).astype(np.float32)
    got = run(backend, lambda g: g.ops.cumsum(g.input(a))).reshape(shape)
    exact("cumsum (sequential float32)", got, np.cumsum(a, axis=-1, dtype=np.float32))
    x = a.astype(np.float64)
    n = shape[-1]
    # |error| / (|sum| + running sum of |x|) <= (n - 1) u for sequential summation
    check("cumsum vs fp64", elem_rel(got, np.cumsum(x, -1), np.cumsum(np.abs(x), -1)),
          max(n - 1, 0) * 2**-24, "elem_rel")


# -- window (slice) -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("d", range(4), ids=lambda d: f"ne[{d}]")
@given(shape=st.lists(st.integers(1, 7), min_size=4, max_size=4), seed=seeds, data=st.data(),
       step=st.integers(1, 3), gtype=st.sampled_from(sorted(DTYPES)))
def test_window(backend, shape, seed, data, d, step, kind, gtype):
    """x[start : start + length*step : step] along ne[d]; along ne[0] with a step it takes every
    step-th element of whole rows (copied: ggml views cannot stride inside a row)."""
    ne = list(shape)
    if d == 0 and step > 1:
        ne[0] = step * data.draw(st.integers(1, 4), label="row / step")
        start, length = data.draw(st.integers(0, step - 1), label="start"), ne[0] // step
    else:
        start = data.draw(st.integers(0, ne[d] - 1), label="start")
        length = data.draw(st.integers(1, (ne[d] - 1 - start) // step + 1), label="length")
    box = {}

    def build(g):
        src, box["ref"] = make_source(g, kind, ne, rng_for(seed), DTYPES[gtype], data)
        return g.ops.cont(g.ops.window(src, d, start, length, step))

    got = run(backend, build)
    sel = [slice(None)] * 4
    sel[d] = slice(start, start + (length - 1) * step + 1, step)
    exact(f"window ({'ne[0] strided' if d == 0 and step > 1 else 'view'})", _squeeze4(got),
          _from_ggml(box["ref"][tuple(sel)]))


@given(n=st.integers(1, 12), step=st.integers(2, 5), data=st.data())
def test_window_refuses_strides_inside_part_of_a_row(backend, n, step, data):
    """A step along ne[0] that does not take every step-th element of whole rows (row not
    divisible by the step, start at or above it, or fewer elements) is a ShapeError, even though
    the window fits in the row."""
    start = data.draw(st.integers(0, n - 1), label="start")
    length = data.draw(st.integers(1, (n - 1 - start) // step + 1), label="length")
    assume(not (n % step == 0 and start < step and length == n // step))  # that one is test_window's
    with GraphRunner(backend, max_nodes=16) as g:
        x = g.input(np.zeros((2, n), np.float32))
        with pytest.raises(ShapeError, match=r"^slice: a strided window along ne\[0\] must take every"):
            g.ops.window(x, 0, start, length, step)


@given(shape=st.lists(st.integers(1, 6), min_size=4, max_size=4), d=st.integers(-1, 4), step=st.integers(0, 3),
       data=st.data())
def test_window_out_of_range(backend, shape, d, step, data):
    """Windows past the end, of no elements, with a step below 1 or in no dimension: ShapeError."""
    n = shape[d] if 0 <= d < 4 else 1
    start = data.draw(st.integers(-1, n + 1), label="start")
    length = data.draw(st.integers(0, n + 2), label="length")
    fits = 0 <= d < 4 and step >= 1 and start >= 0 and length >= 1 and start + (length - 1) * step < n
    assume(not fits)
    with GraphRunner(backend, max_nodes=16) as g:
        x = g.input(np.zeros(tuple(reversed(shape)), np.float32))
        msg = (rf"^slice: window start={start} length={length} step={step} does not fit ne\[{d}\]={n}"
               if 0 <= d < 4 else r"^slice: dimension")
        with pytest.raises(ShapeError, match=msg):
            g.ops.window(x, d, start, length, step)


# -- repeat, pad --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOURCES)
@given(shape=st.lists(st.integers(1, 5), min_size=4, max_size=4),
       reps=st.lists(st.integers(1, 3), min_size=4, max_size=4), seed=seeds, data=st.data())
def test_repeat(backend, shape, reps, seed, data, kind):
    """Tile to a multiple of the source in each ggml dimension (trailing 1s of the target may be
    left out)."""
    ne = list(shape)
    target = [n * r for n, r in zip(ne, reps)]
    needed = max([i + 1 for i in range(4) if target[i] != 1], default=1)
    n_dims = data.draw(st.integers(needed, 4), label="target dims given")
    box = {}

    def build(g):
        src, box["ref"] = make_source(g, kind, ne, rng_for(seed), np.float32, data)
        return g.ops.repeat(src, target[:n_dims])

    got = run(backend, build)
    ref = np.tile(box["ref"], [t // n for t, n in zip(target, ne)])
    exact("repeat", _squeeze4(got), _from_ggml(ref))


@pytest.mark.parametrize("kind", SOURCES)
@given(shape=st.lists(st.integers(1, 5), min_size=4, max_size=4),
       pads=st.lists(st.integers(0, 3), min_size=8, max_size=8), seed=seeds, data=st.data(), n_pads=st.integers(0, 8))
def test_pad(backend, shape, pads, seed, data, kind, n_pads):
    """Zeros before/after along each ggml dimension (1..8 counts given; the rest are 0)."""
    pads = pads[:n_pads] + [0] * (8 - n_pads)
    box = {}

    def build(g):
        src, box["ref"] = make_source(g, kind, list(shape), rng_for(seed), np.float32, data)
        return g.ops.pad(src, pads[:n_pads])

    got = run(backend, build)
    ref = np.pad(box["ref"], [(pads[2 * i], pads[2 * i + 1]) for i in range(4)])
    exact("pad", _squeeze4(got), _from_ggml(ref))


# -- the spec interpreter reaches the same wrappers ----------------------------------------------

# spec op -> (attributes, the same wrapper call); inputs are positive so log and recip apply
_SPEC_CASES = {
    **{op: ({}, lambda o, x, op=op: getattr(o, op)(x)) for op in sorted(_T) + ["recip", "cumsum"]},
    "slice": ({"dim": 1, "start": 1, "length": 2, "step": 2}, lambda o, x: o.window(x, 1, 1, 2, 2)),
    "slice ne[0]": ({"start": 1, "length": 3}, lambda o, x: o.window(x, 0, 1, 3)),
    "slice ne[0] strided": ({"dim": 0, "start": 1, "length": 3, "step": 2}, lambda o, x: o.window(x, 0, 1, 3, 2)),
    "clamp": ({"min": 0.5, "max": 1.5}, lambda o, x: o.clamp(x, 0.5, 1.5)),
    "repeat": ({"shape": [12, 10, 2]}, lambda o, x: o.repeat(x, [12, 10, 2])),
    "pad": ({"pads": [1, 0, 0, 2, 1]}, lambda o, x: o.pad(x, [1, 0, 0, 2, 1])),
    "fill": ({"value": -2.5}, lambda o, x: o.fill(x, -2.5)),
}


@pytest.mark.parametrize("case", list(_SPEC_CASES))
def test_spec_interpreter(backend, case):
    """A one-node graph spec of each traced-path op computes what its wrapper computes (the
    attribute names of porter.spec.OPS reach the right arguments)."""
    from porter.runtime.graph import GraphBuilder
    from porter.spec import Node, Spec, WeightDecl, check as check_spec

    op = case.split()[0]
    attrs, direct = _SPEC_CASES[case]
    a = rng_for(len(case)).uniform(0.1, 2.0, (5, 6)).astype(np.float32)  # ne [6, 5]
    spec = check_spec(Spec(version=2, architecture="one_op", hparams={}, inputs=[],
                           weights=[WeightDecl(name="x", shape=[5, 6])],
                           graph=[Node(name="y", op=op, inputs=["x"], attrs=attrs)], outputs=["y"]))
    with GraphRunner(backend, max_nodes=64) as g:
        x = g.input(a, name="x")
        y = GraphBuilder(spec, g.ops, {"x": x}, {}, {}).build()["y"]
        got, ref = g.compute([g.ops.cont(y), g.ops.cont(direct(g.ops, x))])
    exact("spec interpreter = wrapper", got, ref)


def test_spec_cases_cover_the_traced_ops():
    from porter.spec import OPS

    traced = {"neg", "abs", "cos", "sin", "log", "recip", "softplus", "gelu_quick", "elu", "step", "cumsum",
              "slice", "clamp", "repeat", "pad", "fill"}
    assert traced <= set(OPS)
    assert {c.split()[0] for c in _SPEC_CASES} == traced


def test_reference_helpers_can_fail():
    """The layout references do distinguish ggml dimensions (no tautologies)."""
    a = np.arange(24.0).reshape(2, 3, 4)
    g4 = _ggml_order(a)
    assert g4.shape == (4, 3, 2, 1)
    assert np.array_equal(_from_ggml(g4), a.reshape(1, 2, 3, 4))
    assert not np.array_equal(np.tile(g4, [2, 1, 1, 1]), np.repeat(g4, 2, axis=0))
