"""The one-query (decode step) masks equal the general construction's row for that query."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from porter.runtime.masks import attention_masks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_one_query_masks_equal_the_general_rows(causal, window):
    spec = SimpleNamespace(causal=causal, hparams={"sliding_window": window} if window else {}, inputs=[])
    for n_kv in (1, 8, 32):
        for n_valid in range(n_kv + 1):
            for q in range(n_kv + 2):
                fast = attention_masks(spec, np.array([q], np.int32), n_kv, n_valid)
                general = attention_masks(spec, np.array([q, q], np.int32), n_kv, n_valid)  # two queries: no fast path
                assert fast.keys() == general.keys() == ({"kq_mask", "kq_mask_swa"} if window else {"kq_mask"})
                for name, mask in fast.items():
                    assert mask.shape == (1, n_kv) and mask.dtype == np.float16
                    assert np.array_equal(mask, general[name][:1]), (n_kv, n_valid, q, name)


def test_one_query_mask_values():
    spec = SimpleNamespace(causal=True, hparams={"sliding_window": 2}, inputs=[])
    m = attention_masks(spec, np.array([3], np.int32), 8, 4)
    assert m["kq_mask"].tolist() == [[0, 0, 0, 0, -np.inf, -np.inf, -np.inf, -np.inf]]
    assert m["kq_mask_swa"].tolist() == [[-np.inf, -np.inf, 0, 0, -np.inf, -np.inf, -np.inf, -np.inf]]
