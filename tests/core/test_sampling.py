"""Sampling: greedy is argmax; seeded sampling reproduces; top-k and top-p restrict the choice."""

from __future__ import annotations

import numpy as np

from porter.runtime.model import sample


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert sample(logits) == 1
    assert sample(logits, temperature=0.0, top_k=3) == 1


def test_seeded_sampling_reproduces_and_varies():
    logits = np.zeros(50, dtype=np.float32)
    a = [sample(logits, temperature=1.0, rng=np.random.default_rng(7)) for _ in range(5)]
    b = [sample(logits, temperature=1.0, rng=np.random.default_rng(7)) for _ in range(5)]
    assert a == b
    rng = np.random.default_rng(7)
    draws = {sample(logits, temperature=1.0, rng=rng) for _ in range(200)}
    assert len(draws) > 20  # uniform logits: many different tokens


def test_top_k_and_top_p_restrict():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(300)} == {0, 1}
    # top_p just above the first token's probability mass keeps the first two
    p = np.exp(logits - logits.max()); p /= p.sum()
    kept = {sample(logits, temperature=1.0, top_p=float(p[0]) + 1e-3, rng=rng) for _ in range(300)}
    assert kept == {0, 1}
    assert {sample(logits, temperature=1.0, top_p=0.01, rng=rng) for _ in range(50)} == {0}
