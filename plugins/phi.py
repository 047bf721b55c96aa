"""Phi (phi-1, phi-1.5, phi-2): one LayerNorm (with bias) feeding attention and MLP in parallel,
partial rotary (neox layout), biases on every projection and on the LM head, plain GELU MLP.

llama.cpp's ``phi2`` architecture accepts separate q/k/v projections (what current checkpoints
hold); porter writes them separately and compares them with transformers node by node.
"""

from __future__ import annotations

from plugins._common import even_rotary
from porter.arch import Architecture
from porter.plugins import hookimpl


class Phi(Architecture):
    model_type = "phi"
    family = "phi"
    gguf_arch = "phi2"
    features = ("layernorm", "rope", "partial_rotary", "parallel_block", "gelu", "bias")
    knobs = {"norm": "layer", "norm_bias": True, "parallel": True, "mlp": "plain", "output_bias": True,
             "hf_attn": "self_attn", "hf_final_norm": "model.final_layernorm"}
    tensors = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.final_layernorm.weight",
        "output_norm.bias": "model.final_layernorm.bias",
        "output.weight": "lm_head.weight",
        "output.bias": "lm_head.bias",
        "blk.{L}.attn_norm.weight": "model.layers.{L}.input_layernorm.weight",
        "blk.{L}.attn_norm.bias": "model.layers.{L}.input_layernorm.bias",
        **{f"blk.{{L}}.attn_{r}.{p}": f"model.layers.{{L}}.self_attn.{r}_proj.{p}"
           for r in "qkv" for p in ("weight", "bias")},
        "blk.{L}.attn_output.weight": "model.layers.{L}.self_attn.dense.weight",
        "blk.{L}.attn_output.bias": "model.layers.{L}.self_attn.dense.bias",
        "blk.{L}.ffn_up.weight": "model.layers.{L}.mlp.fc1.weight",
        "blk.{L}.ffn_up.bias": "model.layers.{L}.mlp.fc1.bias",
        "blk.{L}.ffn_down.weight": "model.layers.{L}.mlp.fc2.weight",
        "blk.{L}.ffn_down.bias": "model.layers.{L}.mlp.fc2.bias",
    }
    # phi checkpoints keep an untied LM head with a bias (llama.cpp's phi2 requires output.weight)
    tiny = {"tie_word_embeddings": False, "qk_layernorm": False, "hidden_act": "gelu_new"}
    space = {"partial_rotary_factor": [0.25, 0.5, 1.0], "hidden_act": ["gelu_new", "gelu"],
             "rope_parameters": [{"rope_type": "default", "rope_theta": 10000.0},
                                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}]}

    def configure(self, k):
        super().configure(k)
        k["output_bias"] = self.has("output.bias")

    @classmethod
    def tiny_config(cls, **overrides):
        overrides["tie_word_embeddings"] = False
        fields = dict(overrides)
        even_rotary(fields, fields.get("head_dim") or 16)
        if "partial_rotary_factor" in fields and "rope_parameters" in fields:
            fields["rope_parameters"] = {**fields["rope_parameters"],
                                         "partial_rotary_factor": fields.pop("partial_rotary_factor")}
        return super().tiny_config(**fields)


@hookimpl
def porter_architectures():
    return [Phi]
