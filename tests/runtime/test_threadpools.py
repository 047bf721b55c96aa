"""The backend's thread policy: a graph given fewer threads (other processes hold cores) gives
the same answer as one given every thread, and the backend says how many it used."""

from __future__ import annotations

import numpy as np

from porter.runtime.core import Backend, GraphRunner


def _product(be: Backend, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with GraphRunner(be) as g:
        (out,) = g.compute([g.ops.mul_mat(g.input(a), g.input(b))])
    return out


def test_fewer_threads_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 256), dtype=np.float32)
    b = rng.standard_normal((8, 256), dtype=np.float32)
    with Backend(2, adaptive=False) as be:
        full = _product(be, a, b)
        assert be.threads_in_use == 2
        monkeypatch.setattr(be.policy, "threads", lambda: 1)  # as if another process held a core
        shared = _product(be, a, b)
        assert be.threads_in_use == 1
        monkeypatch.undo()
        again = _product(be, a, b)
        assert be.threads_in_use == 2
    np.testing.assert_array_equal(shared, full)
    np.testing.assert_array_equal(again, full)
    np.testing.assert_allclose(full, b @ a.T, rtol=1e-5, atol=1e-4)
