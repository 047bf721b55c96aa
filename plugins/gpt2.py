"""GPT-2: learned absolute positions, LayerNorm with bias, fused qkv with bias, plain GELU (tanh)
MLP, LM head tied to the token embeddings, no rotary.

transformers' Conv1D stores weights as (in, out); llama.cpp's converter transposes them to the
usual (out, in) and porter does the same. llama.cpp's gpt2 falls back to token_embd for the
output when a (tied) checkpoint has no separate LM head.
"""

from __future__ import annotations

from plugins._common import FusedQKV, drop_fields
from porter.plugins import hookimpl

_CONV1D = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


class GPT2(FusedQKV):
    model_type = "gpt2"
    family = "gpt2"
    gguf_arch = "gpt2"
    features = ("layernorm", "learned_positions", "fused_qkv", "gelu", "bias")
    knobs = {"norm": "layer", "norm_bias": True, "rope": False, "pos_embd": True, "fused_qkv": True,
             "mlp": "plain", "hf_embed": "transformer.wte", "hf_layers": "transformer.h",
             "hf_attn_norm": "ln_1", "hf_attn": "attn", "hf_ffn_norm": "ln_2",
             "hf_final_norm": "transformer.ln_f"}
    tensors = {
        "token_embd.weight": "transformer.wte.weight",
        "position_embd.weight": "transformer.wpe.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",  # only in untied checkpoints
        "blk.{L}.attn_norm.weight": "transformer.h.{L}.ln_1.weight",
        "blk.{L}.attn_norm.bias": "transformer.h.{L}.ln_1.bias",
        "blk.{L}.attn_qkv.weight": "transformer.h.{L}.attn.c_attn.weight",
        "blk.{L}.attn_qkv.bias": "transformer.h.{L}.attn.c_attn.bias",
        "blk.{L}.attn_output.weight": "transformer.h.{L}.attn.c_proj.weight",
        "blk.{L}.attn_output.bias": "transformer.h.{L}.attn.c_proj.bias",
        "blk.{L}.ffn_norm.weight": "transformer.h.{L}.ln_2.weight",
        "blk.{L}.ffn_norm.bias": "transformer.h.{L}.ln_2.bias",
        "blk.{L}.ffn_up.weight": "transformer.h.{L}.mlp.c_fc.weight",
        "blk.{L}.ffn_up.bias": "transformer.h.{L}.mlp.c_fc.bias",
        "blk.{L}.ffn_down.weight": "transformer.h.{L}.mlp.c_proj.weight",
        "blk.{L}.ffn_down.bias": "transformer.h.{L}.mlp.c_proj.bias",
    }
    tiny = {"activation_function": "gelu_new"}
    space = {"activation_function": ["gelu_new", "gelu", "relu"], "layer_norm_epsilon": [1e-5, 1e-3]}

    def gguf_kv(self):
        kv = super().gguf_kv()
        kv.pop(f"{self.gguf_arch}.attention.head_count_kv", None)  # llama.cpp's converter writes none
        return kv

    def transform(self, gguf_name, arrays):
        w = arrays[0]
        return w.T.copy() if gguf_name.endswith(_CONV1D) else w

    @classmethod
    def checkpoint_shape(cls, gguf_name, shape):
        return shape[::-1] if gguf_name.endswith(_CONV1D) else shape

    def weight_shapes(self):
        # the spec states the GGUF's shapes: the Conv1D matrices as transform writes them
        return {name: shape[::-1] if name.endswith(_CONV1D) else shape
                for name, shape in super().weight_shapes().items()}

    @classmethod
    def tiny_config(cls, **overrides):
        names = {"intermediate_size": "n_inner", "hidden_act": "activation_function"}
        fields = {names.get(k, k): v for k, v in overrides.items()
                  if k != "rope_parameters"}
        fields.setdefault("n_inner", 112)
        config = super().tiny_config(**fields)
        # multi-head attention of hidden_size / heads, no rotary
        return drop_fields(config, "head_dim", "num_key_value_heads", "intermediate_size", "rope_parameters")


@hookimpl
def porter_architectures():
    return [GPT2]
