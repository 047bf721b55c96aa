"""hparams_from_config on transformers' default configs: one spelling whatever the config says.

Expected values are those of transformers 5.23's default configs (``AutoConfig.for_model``).
These tests need no model: only configs.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from porter.introspect import HParams, hparams_from_config, normalize_activation


def hp(model_type: str, **overrides) -> HParams:
    return hparams_from_config(AutoConfig.for_model(model_type, **overrides))


def test_gpt2_old_spellings():
    h = hp("gpt2")  # n_embd / n_layer / n_head / layer_norm_epsilon / activation_function / n_inner=None
    assert (h.hidden_size, h.num_layers, h.num_heads, h.num_kv_heads, h.head_dim) == (768, 12, 12, 12, 64)
    assert h.intermediate_size == 3072  # n_inner None means 4 * n_embd
    assert h.norm_eps == 1e-5 and h.norm_kind == "layer"
    assert (h.hidden_act, h.hidden_act_raw) == ("gelu_tanh", "gelu_new")
    assert h.rope is None and h.rope_by_layer_type is None and h.partial_rotary_factor == 1.0
    assert h.max_position_embeddings == 1024 and h.vocab_size == 50257
    assert h.tie_word_embeddings is True
    assert (h.bos_token_id, h.eos_token_id) == (50256, 50256)
    assert h.extra["norm_eps_key"] == "layer_norm_epsilon"
    assert h.extra["hidden_act_key"] == "activation_function"


def test_llama():
    h = hp("llama")
    assert (h.hidden_size, h.intermediate_size, h.num_layers, h.num_heads, h.num_kv_heads, h.head_dim) == (
        4096, 11008, 32, 32, 32, 128,
    )
    assert (h.norm_kind, h.norm_eps, h.hidden_act) == ("rms", 1e-6, "silu")
    assert h.rope == {"rope_theta": 10000.0, "rope_type": "default"}
    assert h.sliding_window is None and h.layer_types is None
    assert not (h.attention_bias or h.mlp_bias or h.qk_norm or h.tie_word_embeddings)


def test_mistral_gqa_and_window():
    h = hp("mistral")
    assert (h.num_heads, h.num_kv_heads, h.head_dim) == (32, 8, 128)
    assert h.sliding_window == 4096 and h.layer_types is None


def test_qwen2_window_off_unless_use_sliding_window():
    h = hp("qwen2", sliding_window=4096)  # real Qwen2 configs carry a window with use_sliding_window=False
    assert h.sliding_window is None
    assert h.layer_types == ("full_attention",) * 32
    assert h.extra["max_window_layers"] == 28
    assert h.attention_bias is False  # the q/k/v biases are only visible in parameter names


def test_gemma2_hidden_activation_and_softcaps():
    h = hp("gemma2")
    assert (h.hidden_act, h.hidden_act_raw) == ("gelu_tanh", "gelu_pytorch_tanh")
    assert h.extra["hidden_act_key"] == "hidden_activation"
    assert h.extra["attn_logit_softcapping"] == 50.0
    assert h.extra["final_logit_softcapping"] == 30.0
    assert h.extra["query_pre_attn_scalar"] == 256
    assert h.layer_types[:2] == ("sliding_attention", "full_attention") and len(h.layer_types) == 26
    assert h.sliding_window == 4096 and h.head_dim == 256 and h.tie_word_embeddings


def test_gemma3_rope_nested_by_layer_type():
    h = hp("gemma3_text")
    assert set(h.rope_by_layer_type) == {"full_attention", "sliding_attention"}
    assert h.rope_by_layer_type["sliding_attention"]["rope_theta"] == 10000.0
    assert h.rope_by_layer_type["full_attention"]["rope_theta"] == 1_000_000.0
    assert h.rope == h.rope_by_layer_type["full_attention"]  # the global layers' rope
    assert h.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert h.extra["final_logit_softcapping"] is None


def test_gemma3_multimodal_describes_text_config():
    h = hp("gemma3")
    assert h.model_type == "gemma3_text" and h.vocab_size == 262208
    assert h.rope_by_layer_type is not None


@pytest.mark.parametrize(
    ("model_type", "factor", "norm_kind", "act"),
    [
        ("phi", 0.5, "layer", "gelu_tanh"),  # partial_rotary_factor moved into rope_parameters
        ("gpt_neox", 0.25, "layer", "gelu"),  # was rotary_pct
        ("stablelm", 0.25, "layer", "silu"),
        ("phi3", 1.0, "rms", "silu"),
        ("llama", 1.0, "rms", "silu"),
    ],
)
def test_partial_rotary_factor(model_type, factor, norm_kind, act):
    h = hp(model_type)
    assert h.partial_rotary_factor == factor
    assert h.norm_kind == norm_kind and h.hidden_act == act
    assert h.rotary_dim == int(h.head_dim * factor)


def test_gptj_rotary_dim_spelling():
    h = hp("gptj")  # rotary_dim=64 of head_dim 256
    assert h.partial_rotary_factor == 64 / h.head_dim


def test_falcon_multi_query_and_spellings():
    h = hp("falcon")  # multi_query=True, new_decoder_architecture=False: one KV head
    assert (h.num_heads, h.num_kv_heads, h.head_dim) == (71, 1, 64)
    assert h.intermediate_size == 18176  # ffn_hidden_size
    assert (h.hidden_act, h.extra["hidden_act_key"]) == ("gelu", "activation")
    assert h.norm_eps == 1e-5 and not h.attention_bias and not h.mlp_bias  # bias=False
    h40 = hp("falcon", new_decoder_architecture=True, num_kv_heads=8)
    assert h40.num_kv_heads == 8
    h_mha = hp("falcon", multi_query=False)
    assert h_mha.num_kv_heads == 71


def test_starcoder2_use_bias_and_norm_epsilon():
    h = hp("starcoder2")
    assert h.attention_bias and h.mlp_bias
    assert h.norm_eps == 1e-5 and h.extra["norm_eps_key"] == "norm_epsilon"
    assert (h.hidden_act, h.num_kv_heads) == ("gelu_tanh", 2)


def test_multipliers_and_scales_land_in_extra():
    g = hp("granite")
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert g.extra[key] == 1.0
    assert hp("cohere").extra["logit_scale"] == 0.0625
    s = hp("smollm3")
    assert s.extra["no_rope_layers"][:4] == [1, 1, 1, 0] and s.rope["rope_theta"] == 2_000_000.0


def test_moe_fields():
    m = hp("mixtral")
    assert m.head_dim == 128  # head_dim is None in the config: hidden / heads
    assert (m.extra["num_experts"], m.extra["num_experts_per_tok"]) == (8, 2)
    assert m.extra["num_local_experts"] == 8
    q = hp("qwen3_moe")
    assert (q.extra["num_experts"], q.extra["num_experts_per_tok"]) == (128, 8)
    assert q.extra["moe_intermediate_size"] == 768 and q.extra["norm_topk_prob"] is False
    assert q.head_dim == 64


def test_bert_encoder():
    h = hp("bert")
    assert (h.norm_eps, h.norm_kind, h.hidden_act, h.rope) == (1e-12, "layer", "gelu", None)
    assert h.max_position_embeddings == 512 and h.extra["type_vocab_size"] == 2


def test_boilerplate_and_training_keys_not_in_extra():
    h = hp("gpt2")
    for key in ("transformers_version", "use_cache", "initializer_range", "resid_pdrop", "dtype", "n_embd"):
        assert key not in h.extra
    json.dumps(h.to_json())  # JSON-serializable


def test_plain_config_json_dict():
    raw = AutoConfig.for_model("gpt2").to_dict()
    assert hparams_from_config(raw) == hp("gpt2")
    # transformers 4 spellings of rope, as found in older config.json files
    old = hparams_from_config(
        {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_theta": 5e5,
         "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert old.rope == {"factor": 2.0, "rope_theta": 5e5, "rope_type": "linear"}


def test_heterogeneous_per_layer_config():
    """transformers 5 per_layer_config: global reads of per-layer fields raise in transformers."""
    h = hp("gemma4_text")
    assert h.head_dim == 256  # the global value
    assert h.extra["per_layer_config"][5] == {"head_dim": 512}
    assert h.rope["rope_type"] == "proportional" and h.partial_rotary_factor == 0.25


def test_per_layer_list_sizes():
    h = hp("gemma3n_text")  # intermediate_size is a per-layer list (all equal by default)
    assert h.intermediate_size == 16384
    h2 = hp("gemma3n_text", intermediate_size=[64] * 34 + [128])
    assert h2.intermediate_size is None and h2.extra["intermediate_size_per_layer"][-1] == 128


def test_parameters_reveal_biases_and_qk_norm():
    config = AutoConfig.for_model("qwen3")
    params = {
        "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
        "model.layers.0.self_attn.q_proj.bias": (4096,),
        "model.layers.0.self_attn.q_norm.weight": (128,),
        "model.layers.0.input_layernorm.weight": (4096,),
        "model.layers.0.mlp.up_proj.weight": (11008, 4096),
    }
    h = hparams_from_config(config, parameters=params)
    assert h.qk_norm and h.attention_bias and not h.mlp_bias
    # a norm's bias is not a linear bias
    h2 = hparams_from_config(config, parameters={"model.layers.0.ln.weight": (8,), "model.layers.0.ln.bias": (8,)})
    assert not h2.attention_bias and not h2.mlp_bias


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_python", "gelu"),
        ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
        ("gelu_accurate", "gelu_tanh"), ("quick_gelu", "gelu_quick"), ("relu", "relu"),
        ("relu2", "relu2"), ("GELU_NEW", "gelu_tanh"), ("something_new", "something_new"), (None, ""),
    ],
)
def test_normalize_activation(raw, name):
    assert normalize_activation(raw) == name


def test_every_transformers_activation_has_a_name():
    from transformers.activations import ACT2CLS

    from porter.introspect.hparams import ACTIVATIONS

    assert set(ACT2CLS) <= set(ACTIVATIONS)
