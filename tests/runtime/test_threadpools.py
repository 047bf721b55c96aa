"""The backend's two threadpools: graphs given every thread run on the hot pool (idle workers poll
briefly for the next graph), graphs given fewer (other processes hold cores) on the cold pool
(idle workers sleep); the answer does not depend on which pool or how many threads ran it."""

from __future__ import annotations

import numpy as np
import pytest

from porter.runtime.core import Backend, GraphRunner, live_objects


def _product(be: Backend, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with GraphRunner(be) as g:
        (out,) = g.compute([g.ops.mul_mat(g.input(a), g.input(b))])
    return out


def test_fewer_threads_run_on_the_cold_pool_with_the_same_answer(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 256), dtype=np.float32)
    b = rng.standard_normal((8, 256), dtype=np.float32)
    with Backend(2, adaptive=False) as be:
        full = _product(be, a, b)
        assert be.threads_in_use == 2
        hot = be.threadpool
        assert live_objects()["threadpool"] == 1  # the cold pool starts only when needed
        monkeypatch.setattr(be.policy, "threads", lambda: 1)  # as if another process held a core
        shared = _product(be, a, b)
        assert be.threads_in_use == 1 and be.threadpool != hot
        assert live_objects()["threadpool"] == 2
        monkeypatch.undo()
        again = _product(be, a, b)
        assert be.threads_in_use == 2 and be.threadpool == hot
    assert "threadpool" not in live_objects()
    np.testing.assert_array_equal(shared, full)
    np.testing.assert_array_equal(again, full)
    np.testing.assert_allclose(full, b @ a.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("poll", ["-1", "101", "spin"])
def test_a_bad_polling_level_is_refused(monkeypatch, poll):
    monkeypatch.setenv("PORTER_POLL", poll)
    with pytest.raises(ValueError, match="PORTER_POLL"):
        Backend(1)
