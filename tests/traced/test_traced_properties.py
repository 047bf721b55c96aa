"""Traced-path properties: model types no plugin claims, across their configuration space (layers,
heads, grouped kv heads, head size, MLP width), against transformers at run time.

Each example shrinks the type's config with the drawn sizes, traces it with torch.export, lowers it
and compares logits at every position and prefill-then-decode with transformers. Examples follow
the hypothesis profile (``ci``: derandomized, a few examples: each one is a full trace)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.testing.parity import port_tiny_traced, stepped_logits

pytestmark = pytest.mark.parity
GATE = 1e-6
TYPES = ["helium", "ernie4_5", "seed_oss"]  # llama-like decoders with their own twists, no plugin
TRACED = settings(max_examples=min(settings().max_examples, 4), deadline=None,
                  suppress_health_check=list(HealthCheck))


@st.composite
def sizes(draw):
    kv = draw(st.sampled_from([1, 2]), label="kv heads")
    heads = kv * draw(st.sampled_from([1, 2]), label="heads per kv head")
    head_dim = draw(st.sampled_from([8, 16]), label="head_dim")
    return {"num_hidden_layers": draw(st.integers(1, 3), label="layers"), "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim,
            "hidden_size": heads * head_dim,  # some of them size o_proj by hidden_size
            "intermediate_size": draw(st.sampled_from([24, 64]), label="mlp width")}


@pytest.mark.parametrize("model_type", TYPES)
@TRACED
@given(overrides=sizes(), n=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_traced_port_matches_transformers_across_sizes(model_type, overrides, n, seed):
    with tempfile.TemporaryDirectory() as tmp, port_tiny_traced(model_type, overrides, tmp) as pair:
        ids = [int(i) for i in np.random.default_rng(seed).integers(0, pair.porter.n_vocab, n)]
        ref = hf_logits(pair.hf, ids)
        e = nmse(ref, pair.porter.logits(ids))
        assert e <= GATE, f"{model_type} {overrides}: traced logits NMSE {e:.3e} at {n} tokens"
        split = max(1, n // 2)
        ec = nmse(ref, stepped_logits(pair.porter, ids, split))
        assert ec <= GATE, f"{model_type} {overrides}: prefill {split} + decode NMSE {ec:.3e}"
        if overrides["num_hidden_layers"] > 1:
            assert pair.porter.spec.layer_loop is not None, f"{model_type} {overrides}: layers unrolled"
