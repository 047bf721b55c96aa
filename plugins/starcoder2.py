"""StarCoder2: Mistral's attention (GQA, optional sliding window) with LayerNorm (with bias),
biases on every projection (``use_bias``) and a plain GELU (tanh) MLP (c_fc, c_proj)."""

from __future__ import annotations

from plugins.mistral import Mistral
from porter.plugins import hookimpl


class Starcoder2(Mistral):
    model_type = "starcoder2"
    family = "starcoder"
    gguf_arch = "starcoder2"
    features = ("layernorm", "rope", "gqa", "gelu", "bias", "sliding_window")
    rope_mode = 2  # neox rope on unpermuted q/k, as llama.cpp's starcoder2 does
    knobs = {"norm": "layer", "norm_bias": True, "mlp": "plain", "hf_qkv": True}
    tensors = {
        **{k: v for k, v in Mistral.tensors.items() if ".ffn_" not in k or "ffn_norm" in k},
        "output_norm.bias": "model.norm.bias",
        "blk.{L}.attn_norm.bias": "model.layers.{L}.input_layernorm.bias",
        "blk.{L}.ffn_norm.bias": "model.layers.{L}.post_attention_layernorm.bias",
        "blk.{L}.ffn_up.weight": "model.layers.{L}.mlp.c_fc.weight",
        "blk.{L}.ffn_up.bias": "model.layers.{L}.mlp.c_fc.bias",
        "blk.{L}.ffn_down.weight": "model.layers.{L}.mlp.c_proj.weight",
        "blk.{L}.ffn_down.bias": "model.layers.{L}.mlp.c_proj.bias",
    }
    tiny = {"use_bias": True, "hidden_act": "gelu_pytorch_tanh"}
    space = {"use_bias": [True, False], "hidden_act": ["gelu_pytorch_tanh", "gelu"]}


@hookimpl
def porter_architectures():
    return [Starcoder2]
