"""Parity properties: every plugin, across its configuration space, against transformers.

Examples per property follow the hypothesis profile (``ci``: derandomized, bounded). Each
example builds a tiny random checkpoint, converts it, and compares node by node at run time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.parity.harness import run_parity
from porter.plugins import architectures, builtin_architectures
from porter.testing.parity import assert_cache_consistent, assert_parity, port_tiny
from porter.testing.strategies import configs

pytestmark = pytest.mark.parity
MODEL_TYPES = sorted(builtin_architectures())  # outside plugins bring their own suites
# parity examples build and convert a model each: a third of the profile's examples (ci: 8,
# thorough: 166), a sixth for q8_0 (ci: 4, thorough: 83), so a deeper profile deepens them too
PARITY = settings(max_examples=max(1, settings().max_examples // 3), suppress_health_check=list(HealthCheck))
Q8_0 = settings(max_examples=max(1, settings().max_examples // 6), suppress_health_check=list(HealthCheck))


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
@Q8_0
@given(data=st.data())
def test_q8_0_parity(model_type, data):
    """Gated on the port's own error: transformers runs the GGUF's dequantized weights (as
    ``porter parity --against gguf``), so no config draw fails on the format's rounding alone
    (gemma, hidden 32, one head: q8_0 logits NMSE 5.3e-3 against the checkpoint, the port exact);
    the error against the checkpoint's own weights is reported in the message."""
    overrides = data.draw(configs(model_type), label="config")
    # rows of whole q8_0 blocks (32): hidden, head_dim and the MLP width
    overrides.update(hidden_size=32 * overrides["num_attention_heads"], head_dim=32, intermediate_size=96)
    overrides.update(architectures()[model_type].q8_0_overrides(overrides))
    with tempfile.TemporaryDirectory() as tmp, port_tiny(model_type, overrides, tmp, outtype="q8_0") as pair:
        ids = data.draw(st.lists(st.integers(0, pair.porter.n_vocab - 1), min_size=16, max_size=48), label="ids")
        format_error = run_parity(pair.hf, pair.porter, ids, "q8_0").logits.get("nmse")
        pair.hf = gguf_weights_reference(pair, Path(tmp) / "gguf-weights")
        assert_parity(pair, ids, context=f"{model_type} q8_0 {overrides} (against the GGUF's weights; against the "
                                         f"checkpoint's, logits NMSE {format_error:.2e})")


def gguf_weights_reference(pair, directory: Path):
    """transformers with the weights the pair's GGUF stores (dequantized)."""
    from porter.parity.logits import load_reference
    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture

    plan = architecture(pair.checkpoint).conversion_plan()
    checkpoint_with_gguf_weights(pair.checkpoint, plan, pair.gguf, directory)
    return load_reference(directory)[0]
