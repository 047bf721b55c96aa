"""KV cache types: F16 and Q8_0 caches compute what the F32 cache computes, up to their rounding,
in one pass and step by step (a quantized cache stores blocks: its views must stride by rows)."""

from __future__ import annotations

import numpy as np
import pytest

import porter
from porter.parity.metrics import nmse
from porter.testing.parity import port_tiny


@pytest.mark.parametrize("cache_type, gate", [("f16", 1e-5), ("q8_0", 1e-3)])
def test_cache_types_match_f32(tmp_path, cache_type, gate):
    overrides = {"hidden_size": 128, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 256, "vocab_size": 128}
    with port_tiny("llama", overrides, tmp_path) as pair:
        ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, 40)]
        ref = pair.porter.logits(ids)
        with porter.load(pair.gguf, cache_type=cache_type) as m:
            assert nmse(ref, m.logits(ids)) < gate
            m.reset()
            m.forward(ids[:30])
            steps = np.stack([m.forward([t])[-1] for t in ids[30:]])
        assert nmse(ref[30:], steps) < gate
