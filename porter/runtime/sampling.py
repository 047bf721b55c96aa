"""Choosing the next token from logits: greedy, or temperature sampling restricted by top-k/top-p.

No full-vocabulary sort: top-k takes the k best with ``argpartition`` (linear time) and sorts
only those; top-p grows a candidate set the same way until it holds the requested probability
mass (almost always the first, small one), which gives exactly the nucleus a full sort would;
plain temperature sampling draws from the whole distribution by its cumulative sum.
"""

from __future__ import annotations

import numpy as np

FIRST_CANDIDATES = 64  # top-p: the first candidate set; it grows 8x until it holds the mass


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of x, largest first (ties: lower index first)."""
    if k >= x.size:
        return np.argsort(-x, kind="stable")
    part = np.argpartition(-x, k - 1)[:k]
    return part[np.lexsort((part, -x[part]))]


def sample(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """Greedy when temperature is 0, else softmax sampling restricted by top-k and top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    x = np.asarray(logits, dtype=np.float64) / temperature
    n = x.size
    if top_k > 0 and top_k < n:
        order = _top(x, top_k)
    elif top_p < 1.0:
        e = np.exp(x - x.max())
        need = top_p * e.sum()
        k = min(FIRST_CANDIDATES, n)
        while True:
            order = _top(e, k)
            if k >= n or e[order].sum() >= need:
                break
            k = min(n, 8 * k)
    else:  # the whole vocabulary: no order needed
        p = np.exp(x - x.max())
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), n - 1))
    p = np.exp(x[order] - x[order[0]])
    if top_p < 1.0:
        # the nucleus is measured against the distribution after top-k (as before): renormalize
        p /= p.sum() if top_k > 0 and top_k < n else np.exp(x - x[order[0]]).sum()
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep]
    p = p / p.sum()
    return int(order[rng.choice(len(order), p=p)])
