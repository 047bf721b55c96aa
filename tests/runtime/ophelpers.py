"""Shared helpers of the op property tests: run a small graph, measure errors, record the worst.

Error measures (all computed in float64):

- ``max_rel``: ``max|got - ref| / max|ref|`` (infinity-norm relative error), the default;
- ``norm_rel``: ``||got - ref||_2 / ||ref||_2`` (square root of NMSE), for quantized products;
- ``elem_rel``: ``max |got - ref| / (|ref| + floor)``, element by element, for unary functions;
- ``dot_rel``: for products ``x @ w.T``, ``max_ij |got - ref|_ij / (||x_i|| ||w_j||)``: the error of
  each dot product relative to the Cauchy-Schwarz bound of its magnitude. Unlike a relative error
  it does not blow up when a dot product cancels to nearly zero, and a rounding of the
  activations by a relative (norm) amount ``r`` moves it by at most ``r``.

Every check records the worst error seen per op; ``tests/runtime/conftest.py`` prints the table
at the end of the run.
"""

from __future__ import annotations

import numpy as np

from porter.runtime.core import GraphRunner

WORST: dict[str, dict] = {}


def run(backend, build, max_nodes: int = 256):
    """Build a graph with ``build(g)`` (returning one tensor or a list) and compute it."""
    with GraphRunner(backend, max_nodes=max_nodes) as g:
        outs = build(g)
        single = not isinstance(outs, (list, tuple))
        res = g.compute([outs] if single else list(outs))
    return res[0] if single else res


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def max_rel(got, ref) -> float:
    got, ref = _f64(got), _f64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    d = float(np.abs(got - ref).max()) if ref.size else 0.0
    s = float(np.abs(ref).max()) if ref.size else 0.0
    return d / s if s > 0 else d


def norm_rel(got, ref) -> float:
    got, ref = _f64(got), _f64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    s = float(np.sqrt((ref ** 2).sum()))
    d = float(np.sqrt(((got - ref) ** 2).sum()))
    return d / s if s > 0 else d


def elem_rel(got, ref, floor) -> float:
    got, ref = _f64(got), _f64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    assert np.isfinite(got).all() == np.isfinite(ref).all(), "non-finite values differ"
    return float((np.abs(got - ref) / (np.abs(ref) + floor)).max()) if ref.size else 0.0


def dot_rel(got, ref, x_norms, w_norms) -> float:
    """``got``/``ref`` of shape (..., n, m) for x rows of norms (..., n) and w rows (..., m)."""
    got, ref = _f64(got), _f64(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != reference {ref.shape}"
    scale = _f64(x_norms)[..., :, None] * _f64(w_norms)[..., None, :]
    scale = np.where(scale > 0, scale, 1.0)
    return float((np.abs(got - ref) / scale).max()) if ref.size else 0.0


def row_norms(a) -> np.ndarray:
    return np.sqrt((_f64(a) ** 2).sum(-1))


def check(op: str, err: float, bound: float, metric: str = "max_rel") -> None:
    """Record ``err`` for ``op`` and assert it is within ``bound`` (NaN fails).

    The table keeps, per op, the largest error and the example closest to its bound (bounds may
    depend on the example, e.g. rope's on the largest position)."""
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
    entry = WORST.setdefault(op, {"worst": 0.0, "ratio": 0.0, "bound": bound, "metric": metric, "n": 0})
    entry["n"] += 1
    if not err <= entry["worst"]:
        entry["worst"] = err
    if not ratio <= entry["ratio"] or entry["n"] == 1:
        entry["ratio"], entry["bound"] = ratio, bound
    assert err <= bound, f"{op}: {metric} error {err:.3g} exceeds the bound {bound:.3g}"


def exact(op: str, got, ref) -> None:
    """Assert bit-for-bit equality (recorded as error 0 or 1)."""
    got, ref = np.asarray(got), np.asarray(ref)
    same = got.shape == ref.shape and got.dtype == ref.dtype and np.array_equal(got, ref, equal_nan=True)
    check(op, 0.0 if same else 1.0, 0.0, "exact")


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
