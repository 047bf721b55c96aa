"""OLMo (the first one): Llama with LayerNorms that have no weight or bias, and q, k and v
optionally clamped to [-clip_qkv, clip_qkv] after their projections. llama.cpp's ``olmo``
permutes q/k as for llama and reads the bound from ``olmo.attention.clamp_kqv``."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Olmo(Llama):
    model_type = "olmo"
    family = "olmo"
    gguf_arch = "olmo"
    features = ("layernorm", "norm_no_weight", "rope", "gqa", "swiglu", "clip_qkv")
    knobs = {"norm": "layer", "norm_weight": False}  # OlmoLayerNorm: F.layer_norm(x, None, None, eps=1e-5)
    gguf_config = {"attention.clamp_kqv": "clip_qkv"}
    space = {"mlp_bias": [False], "clip_qkv": [None, 0.5, 2.0]}  # attention_bias and rope types as llama

    def gguf_kv(self):
        kv = super().gguf_kv()
        if self.clip_qkv() is not None:
            kv[f"{self.gguf_arch}.attention.clamp_kqv"] = self.clip_qkv()
        return kv


@hookimpl
def porter_architectures():
    return [Olmo]
