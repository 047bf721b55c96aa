"""Q4_0 matrices go to ggml's CPU_REPACK buffer and compute what the plain layout computes."""

from __future__ import annotations

import pytest

import porter
from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.runtime import repack
from porter.testing.parity import port_tiny


@pytest.mark.skipif(repack.repack_buffer_type() is None, reason="this ggml build has no CPU_REPACK buffer")
def test_q4_0_repacked_matches_plain_layout(tmp_path):
    overrides = {"hidden_size": 128, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 256, "vocab_size": 128}
    with port_tiny("llama", overrides, tmp_path, outtype="q4_0") as pair:
        ids = list(range(3, 40))
        assert pair.porter.repacked, "no weight was placed in the repack buffer"
        assert all(not n.startswith("token_embd") for n in pair.porter.repacked)  # get_rows needs the plain layout
        packed = pair.porter.logits(ids)
        with porter.load(pair.gguf, use_repack=False) as plain:
            assert plain.repacked == []
            flat = plain.logits(ids)
        ref = hf_logits(pair.hf, ids)
        assert nmse(flat, packed) < 1e-3
        # repacking costs no accuracy against transformers (Q4_0 of random weights is coarse anyway)
        assert nmse(ref, packed) < 1.2 * nmse(ref, flat) + 1e-3
