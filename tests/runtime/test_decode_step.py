"""A decode step (one new token after cached ones: the step generation repeats) writes its inputs
straight into the graph's host memory (``Model._decode_step``). Its logits are bit for bit those
of the general path on the same graph, with causal and sliding-window masks; the cache-consistency
parity suites compare the same steps against transformers."""

from __future__ import annotations

import numpy as np
import pytest

from porter.testing.parity import port_tiny


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_a_decode_step_equals_the_general_path(tmp_path, monkeypatch, arch, overrides):
    with port_tiny(arch, overrides, tmp_path, seed=6, n_ctx=64) as pair:
        m = pair.porter
        ids = np.random.default_rng(7).integers(0, m.n_vocab, 14).tolist()
        m.reset()
        m.forward(ids[:3])
        steps = []
        decode_step = m._decode_step
        monkeypatch.setattr(m, "_decode_step", lambda token: steps.append(decode_step(token)) or steps[-1])
        for token in ids[3:]:
            start = m.kv.n_past
            fast = m.forward([token])
            assert m.kv.n_past == start + 1
            m.kv.n_past = start  # the same step again, through the general path (same graph)
            general = m.forward([token], all_logits=True)
            np.testing.assert_array_equal(fast, general)
        assert len(steps) == len(ids) - 3 and all(s is not None for s in steps)
        m.kv.n_past = 0  # the first position clears recurrent states: the general path
        m.forward([ids[0]])
        assert steps[-1] is None


def test_a_decode_step_checks_what_forward_checks(tmp_path):
    with port_tiny("llama", {}, tmp_path, seed=6, n_ctx=8) as pair:
        m = pair.porter
        m.forward([1, 2, 3])
        with pytest.raises(ValueError, match="token ids must be in"):
            m.forward([m.n_token_rows])
        with pytest.raises(ValueError, match="1-D sequence"):  # one token, but not an id
            m.forward([[5]])
        assert m.kv.n_past == 3
        m.forward([4] * 5)
        with pytest.raises(ValueError, match="context full"):
            m.forward([5])
        assert m.kv.n_past == 8
