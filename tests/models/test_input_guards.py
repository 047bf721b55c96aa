"""Inputs that would index past a learned table (ggml would abort) are refused in Python."""

from __future__ import annotations

import pytest

from porter.testing.parity import port_tiny


def test_positions_beyond_the_learned_table(tmp_path):
    with port_tiny("gpt2", {"max_position_embeddings": 16}, tmp_path) as pair:
        m = pair.porter
        assert m.n_ctx == 16  # clamped to the table
        with pytest.raises(ValueError, match="exceed the model's 16 learned positions"):
            m.forward(list(range(20)), use_cache=False)
        m.reset()
        m.forward(list(range(16)))
        with pytest.raises(ValueError, match="context full"):
            m.forward([1])


def test_token_types_beyond_the_table(tmp_path):
    with port_tiny("bert", None, tmp_path) as pair:
        with pytest.raises(ValueError, match=r"token_types must be 3 ids in \[0, 2\)"):
            pair.porter.forward([1, 2, 3], use_cache=False, token_types=[0, 5, 1])
        assert pair.porter.forward([1, 2, 3], use_cache=False, token_types=[0, 1, 1]).shape[0] == 3
