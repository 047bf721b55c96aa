"""StableLM: Llama's layout with LayerNorm (with bias), partial rotary (neox layout), optional
q/k/v biases, optional per-head q/k LayerNorm (no bias) and optional parallel residual (one
norm feeding attention and MLP).

transformers keeps one LayerNorm module per head for the q/k norm; llama.cpp's converter stacks
them into one ``attn_q_norm.weight`` of [heads, head_dim], and porter does the same.
"""

from __future__ import annotations

import numpy as np

from plugins._common import even_rotary
from plugins.llama import Llama
from porter.convert.plan import TensorPlan
from porter.plugins import hookimpl

_NORMS = {"attn_q_norm": "q_layernorm", "attn_k_norm": "k_layernorm"}


class StableLm(Llama):
    model_type = "stablelm"
    family = "stablelm"
    gguf_arch = "stablelm"
    features = ("layernorm", "rope", "partial_rotary", "gqa", "swiglu", "qk_norm")
    rope_mode = 2  # neox rope on unpermuted q/k, as llama.cpp's stablelm does
    knobs = {"norm": "layer", "norm_bias": True, "qk_norm_bias": False, "hf_qkv": True}
    gguf_config = {"use_parallel_residual": "use_parallel_residual"}
    tensors = {
        **Llama.tensors,
        "output_norm.bias": "model.norm.bias",
        "blk.{L}.attn_norm.bias": "model.layers.{L}.input_layernorm.bias",
        "blk.{L}.ffn_norm.bias": "model.layers.{L}.post_attention_layernorm.bias",
    }
    tiny = {"use_parallel_residual": False, "qk_layernorm": False, "use_qkv_bias": False}
    space = {"use_qkv_bias": [False, True], "qk_layernorm": [False, True],
             "use_parallel_residual": [False, True], "partial_rotary_factor": [0.25, 0.5, 1.0],
             "rope_parameters": [{"rope_type": "default", "rope_theta": 10000.0},
                                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}]}

    def norm_sources(self, gguf_name: str) -> list[str]:
        """The per-head norm weights a stacked blk.N.attn_{q,k}_norm.weight is made of."""
        _, layer, role, _ = gguf_name.split(".")
        heads = self.hp.num_heads if role == "attn_q_norm" else self.hp.num_kv_heads
        srcs = [f"model.layers.{layer}.self_attn.{_NORMS[role]}.norms.{h}.weight" for h in range(heads)]
        return srcs if all(s in self.info.parameters for s in srcs) else []

    def tensor_plans(self):
        plans = super().tensor_plans()
        for role in _NORMS:
            for name in self.layer_names(f"blk.{{L}}.{role}.weight"):
                if srcs := self.norm_sources(name):
                    plans.append(TensorPlan(gguf_name=name, sources=srcs, keep_f32=True,
                                            transform=lambda arrays: np.stack(arrays)))
        return plans

    def weight_shapes(self):
        shapes = super().weight_shapes()
        if self.norm_sources("blk.0.attn_q_norm.weight"):
            shapes["blk.{L}.attn_q_norm.weight"] = [self.hp.num_heads, self.hp.head_dim]
            shapes["blk.{L}.attn_k_norm.weight"] = [self.hp.num_kv_heads, self.hp.head_dim]
        return shapes

    def configure(self, k):
        super().configure(k)
        k["qk_norm"] = bool(self.norm_sources("blk.0.attn_q_norm.weight"))
        k["parallel"] = not self.has("blk.0.ffn_norm.weight")  # use_parallel_residual: one norm

    def gguf_kv(self):
        kv = super().gguf_kv()
        kv[f"{self.gguf_arch}.use_parallel_residual"] = not self.has("blk.0.ffn_norm.weight")
        return kv

    @classmethod
    def tiny_config(cls, **overrides):
        fields = dict(overrides)
        even_rotary(fields, fields.get("hidden_size", 64) // fields.get("num_attention_heads", 4))
        if "partial_rotary_factor" in fields and "rope_parameters" in fields:
            fields["rope_parameters"] = {**fields["rope_parameters"],
                                         "partial_rotary_factor": fields.pop("partial_rotary_factor")}
        config = super().tiny_config(**fields)
        if "head_dim" in vars(config):
            delattr(config, "head_dim")  # head size is hidden_size / heads
        return config


@hookimpl
def porter_architectures():
    return [StableLm]
