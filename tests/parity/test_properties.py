"""Parity properties: every plugin, across its configuration space, against transformers.

Examples per property follow the hypothesis profile (``ci``: derandomized, bounded). Each
example builds a tiny random checkpoint, converts it, and compares node by node at run time.
"""

from __future__ import annotations

import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.plugins import architectures, builtin_architectures
from porter.testing.parity import assert_cache_consistent, assert_parity, port_tiny
from porter.testing.strategies import configs

pytestmark = pytest.mark.parity
MODEL_TYPES = sorted(builtin_architectures())  # outside plugins bring their own suites
# parity examples build and convert a model each: fewer than the profile's default
PARITY = settings(max_examples=min(settings().max_examples, 8), suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@PARITY
@given(data=st.data())
def test_f32_parity_across_config_space(model_type, data):
    overrides = data.draw(configs(model_type), label="config")
    n = data.draw(st.integers(1, 64), label="sequence length")
    with tempfile.TemporaryDirectory() as tmp, port_tiny(model_type, overrides, tmp) as pair:
        vocab = pair.porter.n_vocab
        ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n), label="token ids")
        assert_parity(pair, ids, context=f"{model_type} {overrides}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@PARITY
@given(data=st.data())
def test_kv_cache_prefill_equals_prefill_then_decode(model_type, data):
    overrides = data.draw(configs(model_type), label="config")
    n = data.draw(st.integers(2, 40), label="sequence length")
    split = data.draw(st.integers(1, n - 1), label="prefill length")
    with tempfile.TemporaryDirectory() as tmp, port_tiny(model_type, overrides, tmp) as pair:
        ids = data.draw(st.lists(st.integers(0, pair.porter.n_vocab - 1), min_size=n, max_size=n), label="ids")
        assert_cache_consistent(pair, ids, split, context=f"{model_type} {overrides}")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@settings(max_examples=min(settings().max_examples, 4), suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_q8_0_parity(model_type, data):
    overrides = data.draw(configs(model_type), label="config")
    # rows of whole q8_0 blocks (32): hidden, head_dim and the MLP width
    overrides.update(hidden_size=32 * overrides["num_attention_heads"], head_dim=32, intermediate_size=96)
    overrides.update(architectures()[model_type].q8_0_overrides(overrides))
    with tempfile.TemporaryDirectory() as tmp, port_tiny(model_type, overrides, tmp, outtype="q8_0") as pair:
        ids = data.draw(st.lists(st.integers(0, pair.porter.n_vocab - 1), min_size=16, max_size=48), label="ids")
        assert_parity(pair, ids, context=f"{model_type} q8_0 {overrides}")
