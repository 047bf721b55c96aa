"""Falcon's ALiBi variant (falcon-rw): per-head position bias instead of rope, as transformers computes it."""

from __future__ import annotations

import pytest

from porter.parity.harness import run_parity
from porter.plugins import architectures
from porter.testing.parity import assert_cache_consistent, assert_parity, port_tiny

pytestmark = pytest.mark.parity
Falcon = architectures()["falcon"]
# 16 heads: slopes 2^(-k/2) are not exact in bfloat16, so transformers' rounding shows
RW = {"alibi": True, "new_decoder_architecture": False, "multi_query": False, "parallel_attn": False,
      "bias": True, "num_attention_heads": 16, "hidden_size": 128}
IDS = [(7 * i + 3) % 97 for i in range(60)]


class WithoutBf16Rounding(Falcon):
    def spec_hparams(self):
        values = super().spec_hparams()
        values["alibi_bf16"] = False
        return values


def test_alibi_falcon_matches_transformers(tmp_path):
    with port_tiny("falcon", RW, tmp_path) as pair:
        assert "kq_mask_alibi" in [i.kind for i in pair.porter.spec.inputs]
        assert "rope_freq_base" not in pair.porter.spec.hparams  # no rope at all
        assert_parity(pair, IDS)
        assert_cache_consistent(pair, IDS, split=23)


def test_transformers_bfloat16_rounding_of_the_bias_is_reproduced(tmp_path):
    with port_tiny(WithoutBf16Rounding, RW, tmp_path) as pair:
        report = run_parity(pair.hf, pair.porter, IDS, "f32")
        assert not report.passed, report.logits
        assert report.first_divergence.node == "attn_out-0"
