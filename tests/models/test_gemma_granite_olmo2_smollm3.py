"""Tiny random gemma, gemma2, gemma3_text, smollm3, granite and olmo2 models: convert, run and
match transformers at run time (prefill, then decode through the KV cache); and the GGUF carries
llama.cpp's architecture name, keys and tensor names (gguf-py's MODEL_TENSORS for the arch)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.testing.parity import port_tiny, stepped_logits

F32_GATE = 1e-6
# model_type -> (config overrides, llama.cpp arch, architecture keys beyond the common ones)
CASES = {
    "gemma": ({}, "gemma", ["attention.key_length", "attention.value_length"]),
    "gemma2": ({"sliding_window": 4, "num_hidden_layers": 3, "attn_logit_softcapping": 2.0,
                "final_logit_softcapping": 3.0}, "gemma2",
               ["attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"]),
    "gemma3_text": ({"sliding_window": 4, "num_hidden_layers": 3, "sliding_window_pattern": 3,
                     "tie_word_embeddings": False, "final_logit_softcapping": 3.0,
                     "rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
                    "gemma3", ["attention.sliding_window", "rope.scaling.type", "rope.scaling.factor",
                               "rope.freq_base_swa", "attention.sliding_window_pattern"]),
    "smollm3": ({"num_hidden_layers": 3, "no_rope_layer_interval": 2}, "smollm3", []),
    "granite": ({}, "granite", ["embedding_scale", "residual_scale", "attention.scale", "logit_scale"]),
    "olmo2": ({"attention_bias": False}, "olmo2", []),
}
COMMON_KEYS = ["context_length", "embedding_length", "block_count", "feed_forward_length",
               "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
               "rope.dimension_count", "rope.freq_base"]


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    model_type = request.param
    with port_tiny(model_type, CASES[model_type][0], tmp_path_factory.mktemp(model_type), seed=1, n_ctx=64) as pair:
        yield model_type, pair.hf, pair.porter, pair.gguf


@pytest.mark.parity
def test_prefill_then_decode_matches(tiny):
    """Prefill 10 tokens, then decode 8 more one by one; every row equals transformers'."""
    model_type, hf, m, _ = tiny
    ids = np.random.default_rng(3).integers(0, m.n_vocab, 18).tolist()
    ref = hf_logits(hf, ids)
    m.reset()
    full = m.forward(ids, all_logits=True)
    got = stepped_logits(m, ids, 10)
    assert got.shape == ref.shape
    assert nmse(ref, full) <= F32_GATE, f"{model_type}: prefill NMSE {nmse(ref, full):.3e}"
    assert nmse(ref, got) <= F32_GATE, f"{model_type}: cached decode NMSE {nmse(ref, got):.3e}"
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_gguf_names_and_keys_follow_llama_cpp(tiny):
    model_type, hf, _, path = tiny
    _, arch, extra_keys = CASES[model_type]
    r = GGUFReader(path)
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == arch
    for key in COMMON_KEYS + extra_keys:
        assert f"{arch}.{key}" in r.fields, f"{model_type}: missing {arch}.{key}"
    # every tensor is one llama.cpp's arch declares (gguf-py's MODEL_TENSORS), and all its
    # non-optional ones are there
    march = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[march]}
    names = {t.name for t in r.tensors}
    n_layer = hf.config.num_hidden_layers
    for name in names:
        base = name.rsplit(".", 1)[0]
        pattern = base if not base.startswith("blk.") else "blk.{bid}." + base.split(".", 2)[2]
        assert pattern in allowed, f"{model_type}: {name} is not a llama.cpp {arch} tensor"
    for base in ("token_embd", "output_norm", "blk.{bid}.attn_q", "blk.{bid}.attn_k", "blk.{bid}.attn_v",
                 "blk.{bid}.attn_output", "blk.{bid}.ffn_gate", "blk.{bid}.ffn_up", "blk.{bid}.ffn_down"):
        for i in range(n_layer):
            assert base.format(bid=i) + ".weight" in names
    if model_type.startswith("gemma"):  # (1 + w) folded into the stored norm weights
        t = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
        w = hf.model.layers[0].input_layernorm.weight.detach().numpy()
        np.testing.assert_allclose(np.asarray(t.data).reshape(w.shape), w + 1.0, rtol=1e-6)
    else:
        assert "output.weight" in names  # untied tiny models
    if model_type == "gemma3_text":  # what llama.cpp's gemma3 reads: which layers slide, local rope base
        assert [bool(x) for x in r.fields["gemma3.attention.sliding_window_pattern"].contents()] == [True, True, False]
        assert r.fields["gemma3.rope.freq_base_swa"].contents() == pytest.approx(1e4)
        assert r.fields["gemma3.rope.freq_base"].contents() == pytest.approx(1e6)


def test_broken_port_is_detected(tiny):
    """The comparison above can fail: perturb one GGUF weight and it must (with noise, not a
    uniform scale, which the post-sublayer norms of gemma2/3 and olmo2 would undo)."""
    model_type, hf, m, _ = tiny
    ids = list(range(1, 12))
    ref = hf_logits(hf, ids)
    from porter.runtime.core import get_data, set_data

    w = m.weights["blk.0.ffn_down.weight"]
    saved = get_data(w)
    try:
        noise = np.random.default_rng(0).standard_normal(saved.shape) * 0.05 * saved.std()
        set_data(w, (saved + noise).astype(saved.dtype))
        assert nmse(ref, m.logits(ids)) > F32_GATE
    finally:
        set_data(w, saved)
