"""What a plugin author writes to get a parity suite for an architecture (here: qwen3).

Run with `pytest examples/plugin_author` once porter is installed: the pytest plugin that
provides `porter_port` and the hypothesis profiles loads by itself.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from porter.testing import assert_cache_consistent, assert_parity, configs


def test_one_config(porter_port):
    pair = porter_port("qwen3", {"num_hidden_layers": 2})
    assert_parity(pair, [1, 5, 9, 2, 44, 7])


@settings(max_examples=3)
@given(config=configs("qwen3"), n=st.integers(2, 24))
def test_across_the_config_space(porter_port, config, n):
    pair = porter_port("qwen3", config)
    ids = list(range(1, n + 1))
    assert_parity(pair, ids)
    assert_cache_consistent(pair, ids, split=n // 2)
