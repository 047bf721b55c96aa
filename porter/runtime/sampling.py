"""Choosing the next token from logits: greedy, or temperature sampling restricted by top-k/top-p."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """Greedy when temperature is 0, else softmax sampling restricted by top-k and top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = np.searchsorted(np.cumsum(p), top_p) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
