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


def test_policy_acts_on_lasting_competition_only(monkeypatch):
    """Threads follow the median of what else ran over the last HORIZON seconds, once there are
    MIN_SAMPLES samples: a sustained competitor takes its core, a busy instant (a kernel thread
    caught running) flips nothing, and a graph after a pause runs on every thread."""
    from porter.runtime import core

    now = [0.0]
    others = [0]
    monkeypatch.setattr(core, "runnable_elsewhere", lambda: others[0])
    policy = core.ThreadPolicy(4, 4, clock=lambda: now[0])

    def step(n_others: int, dt: float = 0.01) -> int:
        others[0] = n_others
        now[0] += dt
        return policy.threads()

    assert step(0) == 4
    assert [step(2) for _ in range(30)][-1] == 2  # two competitors, sustained: two cores left
    assert step(2, dt=1.0) == 4  # after a pause: too little recent evidence, every thread
    assert [step(0) for _ in range(20)][-1] == 4
    assert step(3) == 4 and step(0) == 4  # a busy instant among quiet ones
    assert [step(1, dt=1.0) for _ in range(5)] == [4] * 5  # one sample per horizon: long prompt graphs
    assert core.ThreadPolicy(4, 4, adaptive=False).threads() == 4
