"""Tiny random models of each decoder plugin: convert, run, and match transformers at run time."""

from __future__ import annotations

import numpy as np
import pytest

from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.testing.parity import port_tiny, stepped_logits

F32_GATE = 1e-6
CASES = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {},
    "qwen3": {},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    model_type = request.param
    with port_tiny(model_type, CASES[model_type], tmp_path_factory.mktemp(model_type), seed=1, n_ctx=64) as pair:
        yield model_type, pair.hf, pair.porter


@pytest.mark.parity
def test_prefill_logits_match(tiny):
    model_type, hf, m = tiny
    ids = np.random.default_rng(0).integers(0, m.n_vocab, 13).tolist()
    ref = hf_logits(hf, ids)
    got = m.logits(ids)
    assert got.shape == ref.shape
    err = nmse(ref, got)
    assert err <= F32_GATE, f"{model_type}: logits NMSE {err:.3e} > {F32_GATE:g}"


@pytest.mark.parity
def test_prefill_then_decode_matches(tiny):
    """Prefill 9 tokens, then decode 6 more one by one through the KV cache."""
    model_type, hf, m = tiny
    ids = np.random.default_rng(1).integers(0, m.n_vocab, 15).tolist()
    ref = hf_logits(hf, ids)
    got = stepped_logits(m, ids, 9)
    err = nmse(ref, got)
    assert err <= F32_GATE, f"{model_type}: cached decode NMSE {err:.3e}"
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_broken_port_is_detected(tiny, tmp_path):
    """The comparison above can fail: perturb one weight of the GGUF's model and it must."""
    model_type, hf, m = tiny
    ids = list(range(1, 12))
    ref = hf_logits(hf, ids)
    from porter.runtime.core import get_data, set_data

    w = m.weights["blk.0.ffn_down.weight"]
    saved = get_data(w)
    try:
        set_data(w, (saved * 1.01).astype(saved.dtype))
        assert nmse(ref, m.logits(ids)) > F32_GATE
    finally:
        set_data(w, saved)
