"""phi3, phi, gpt2, gpt_neox, stablelm, starcoder2, cohere, falcon: tiny random models convert,
run and match transformers at run time (prefill and cached decode), and their GGUF files use
llama.cpp's architecture name, keys, tensor names and fused layouts (checked with gguf-py's own
tables, the ones llama.cpp's converter writes from)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.testing.parity import port_tiny, stepped_logits

F32_GATE = 1e-6
# model_type -> (tiny overrides, llama.cpp architecture, keys llama.cpp reads beyond the common ones)
CASES = {
    "phi3": ({"longrope": True, "partial_rotary_factor": 0.75, "sliding_window": 6}, "phi3",
             ["rope.dimension_count", "rope.scaling.attn_factor", "rope.scaling.original_context_length",
              "attention.sliding_window", "attention.layer_norm_rms_epsilon"]),
    "phi": ({"partial_rotary_factor": 0.5}, "phi2", ["rope.dimension_count", "attention.layer_norm_epsilon"]),
    "gpt2": ({}, "gpt2", ["attention.layer_norm_epsilon"]),
    "gpt_neox": ({"partial_rotary_factor": 0.25}, "gptneox",
                 ["rope.dimension_count", "use_parallel_residual", "attention.layer_norm_epsilon"]),
    "stablelm": ({"qk_layernorm": True, "use_qkv_bias": True}, "stablelm",
                 ["rope.dimension_count", "attention.layer_norm_epsilon"]),
    "starcoder2": ({"sliding_window": 5}, "starcoder2", ["attention.layer_norm_epsilon", "rope.freq_base"]),
    "cohere": ({"use_qk_norm": True}, "command-r", ["logit_scale", "attention.layer_norm_epsilon"]),
    "falcon": ({"num_attention_heads": 8, "hidden_size": 64, "num_key_value_heads": 2}, "falcon",
               ["attention.head_count_kv", "attention.layer_norm_epsilon"]),
}
COMMON_KEYS = ["context_length", "embedding_length", "block_count", "attention.head_count", "feed_forward_length"]


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    model_type = request.param
    with port_tiny(model_type, CASES[model_type][0], tmp_path_factory.mktemp(model_type), seed=2, n_ctx=64) as pair:
        yield model_type, pair.hf, pair.porter, pair.gguf


@pytest.mark.parity
def test_prefill_then_decode_matches_transformers(tiny):
    """All 20 prompt logits, then prefill 12 tokens and decode 8 more one by one (KV cache)."""
    model_type, hf, m, _ = tiny
    ids = np.random.default_rng(3).integers(0, m.n_vocab, 20).tolist()
    ref = hf_logits(hf, ids)
    err = nmse(ref, m.logits(ids))
    assert err <= F32_GATE, f"{model_type}: prefill logits NMSE {err:.3e}"
    got = stepped_logits(m, ids, 12)
    err = nmse(ref, got)
    assert err <= F32_GATE, f"{model_type}: cached decode NMSE {err:.3e}"
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_a_broken_port_is_detected(tiny):
    """The comparison can fail: scale one MLP weight and the logits must leave the gate."""
    model_type, hf, m, _ = tiny
    from porter.runtime.core import get_data, set_data

    ids = list(range(1, 12))
    ref = hf_logits(hf, ids)
    w = m.weights["blk.0.ffn_down.weight"]
    saved = get_data(w)
    try:
        set_data(w, (saved * 1.05).astype(saved.dtype))
        assert nmse(ref, m.logits(ids)) > F32_GATE
    finally:
        set_data(w, saved)


def _allowed_tensor_names(arch_name: str, n_layer: int) -> set[str]:
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = set()
    for t in gguf.MODEL_TENSORS[arch]:
        pattern = gguf.TENSOR_NAMES[t]
        for bid in range(n_layer) if "{bid}" in pattern else [0]:
            names.update({pattern.format(bid=bid) + ".weight", pattern.format(bid=bid) + ".bias"})
    return names


def test_gguf_uses_llama_cpp_names_and_keys(tiny):
    model_type, hf, _, path = tiny
    arch_name = CASES[model_type][1]
    reader = GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch_name
    for key in COMMON_KEYS + CASES[model_type][2]:
        assert f"{arch_name}.{key}" in fields, f"{model_type}: missing {arch_name}.{key}"
    n_layer = hf.config.num_hidden_layers
    names = {t.name for t in reader.tensors}
    stray = names - _allowed_tensor_names(arch_name, n_layer)
    assert not stray, f"{model_type}: tensors llama.cpp's {arch_name} does not know: {sorted(stray)}"
    assert "token_embd.weight" in names and "blk.0.attn_output.weight" in names


def _gguf_tensor(path, name):
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])


def test_fused_layouts_follow_llama_cpp(tiny):
    """Fused q/k/v in [all q; all k; all v] order (llama.cpp's converters reorder gpt_neox's per-head
    and falcon's per-group interleaving), Conv1D transposed (gpt2), phi3 kept as is, longrope
    factors as rope_factors_short/long, stablelm's per-head q norms stacked."""
    model_type, hf, _, path = tiny
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    c = hf.config
    if model_type == "gpt_neox":
        w = sd["gpt_neox.layers.0.attention.query_key_value.weight"]
        per_head = w.reshape(c.num_attention_heads, 3, -1, w.shape[-1])
        want = np.concatenate([per_head[:, i].reshape(-1, w.shape[-1]) for i in range(3)])
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_qkv.weight"), want)
    elif model_type == "falcon":
        w = sd["transformer.h.0.self_attention.query_key_value.weight"]
        g = w.reshape(c.num_kv_heads, c.num_attention_heads // c.num_kv_heads + 2, -1, w.shape[-1])
        want = np.concatenate([g[:, :-2].reshape(-1, w.shape[-1]), g[:, -2].reshape(-1, w.shape[-1]),
                               g[:, -1].reshape(-1, w.shape[-1])])
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_qkv.weight"), want)
        # two-norm layout under llama.cpp's names: attn_norm_2 feeds attention, attn_norm the MLP
        # (llama.cpp computes these files within 1.4e-7 of transformers: bench/llama_cpp_compat.py)
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_norm_2.weight"), sd["transformer.h.0.ln_attn.weight"])
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_norm.weight"), sd["transformer.h.0.ln_mlp.weight"])
    elif model_type == "gpt2":
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_qkv.weight"), sd["transformer.h.0.attn.c_attn.weight"].T)
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.ffn_up.weight"), sd["transformer.h.0.mlp.c_fc.weight"].T)
    elif model_type == "phi3":
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.ffn_up.weight"), sd["model.layers.0.mlp.gate_up_proj.weight"])
        rope = c.rope_parameters
        np.testing.assert_allclose(_gguf_tensor(path, "rope_factors_short.weight"), rope["short_factor"], rtol=1e-6)
        np.testing.assert_allclose(_gguf_tensor(path, "rope_factors_long.weight"), rope["long_factor"], rtol=1e-6)
    elif model_type == "stablelm":
        want = np.stack([sd[f"model.layers.0.self_attn.q_layernorm.norms.{h}.weight"] for h in range(c.num_attention_heads)])
        np.testing.assert_array_equal(_gguf_tensor(path, "blk.0.attn_q_norm.weight"), want)
