"""Llama: the reference decoder. RMSNorm, rotary (rotate-half), GQA, SwiGLU MLP.

llama.cpp's ``llama`` architecture stores q/k projections permuted so that its adjacent-pair
("normal") rope matches transformers' rotate-half rope; porter writes them the same way.
"""

from __future__ import annotations

import numpy as np

from porter.arch import Architecture, permute_for_normal_rope
from porter.plugins import hookimpl


class Llama(Architecture):
    model_type = "llama"
    family = "llama"
    gguf_arch = "llama"
    features = ("rmsnorm", "rope", "gqa", "swiglu")
    rope_mode = 0  # normal rope on permuted q/k, as llama.cpp does
    knobs = {"hf_qkv": False}  # q/k rows are permuted, so their raw outputs differ from transformers'
    tensors = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.{L}.attn_norm.weight": "model.layers.{L}.input_layernorm.weight",
        "blk.{L}.attn_q.weight": "model.layers.{L}.self_attn.q_proj.weight",
        "blk.{L}.attn_k.weight": "model.layers.{L}.self_attn.k_proj.weight",
        "blk.{L}.attn_v.weight": "model.layers.{L}.self_attn.v_proj.weight",
        "blk.{L}.attn_output.weight": "model.layers.{L}.self_attn.o_proj.weight",
        "blk.{L}.attn_q.bias": "model.layers.{L}.self_attn.q_proj.bias",
        "blk.{L}.attn_k.bias": "model.layers.{L}.self_attn.k_proj.bias",
        "blk.{L}.attn_v.bias": "model.layers.{L}.self_attn.v_proj.bias",
        "blk.{L}.attn_output.bias": "model.layers.{L}.self_attn.o_proj.bias",
        "blk.{L}.attn_q_norm.weight": "model.layers.{L}.self_attn.q_norm.weight",
        "blk.{L}.attn_k_norm.weight": "model.layers.{L}.self_attn.k_norm.weight",
        "blk.{L}.ffn_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
        "blk.{L}.ffn_gate.weight": "model.layers.{L}.mlp.gate_proj.weight",
        "blk.{L}.ffn_up.weight": "model.layers.{L}.mlp.up_proj.weight",
        "blk.{L}.ffn_down.weight": "model.layers.{L}.mlp.down_proj.weight",
        "blk.{L}.ffn_gate.bias": "model.layers.{L}.mlp.gate_proj.bias",
        "blk.{L}.ffn_up.bias": "model.layers.{L}.mlp.up_proj.bias",
        "blk.{L}.ffn_down.bias": "model.layers.{L}.mlp.down_proj.bias",
    }

    # what parity properties explore beyond the shared shape space
    space = {
        "attention_bias": [False, True],
        "mlp_bias": [False, True],
        "rope_parameters": [
            {"rope_type": "default", "rope_theta": 10000.0},
            {"rope_type": "default", "rope_theta": 500000.0},
            {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
        ],
    }

    def transform(self, gguf_name: str, arrays: list[np.ndarray]) -> np.ndarray:
        w = arrays[0]
        if self.rope_mode == 0:
            if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
                return permute_for_normal_rope(w, self.hp.num_heads)
            if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
                return permute_for_normal_rope(w, self.hp.num_kv_heads)
        return w


@hookimpl
def porter_architectures():
    return [Llama]
