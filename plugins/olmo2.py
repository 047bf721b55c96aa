"""OLMo 2: Llama with norms on the sublayer outputs instead of their inputs
(``x + norm(attn(x))``, ``h + norm(mlp(h))``) and an RMSNorm over the whole q and k projections
(all heads at once) before rope. llama.cpp's ``olmo2`` uses neox rope on unpermuted q/k."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl

_PRE_NORMS = ("blk.{L}.attn_norm.weight", "blk.{L}.ffn_norm.weight")


class Olmo2(Llama):
    model_type = "olmo2"
    family = "olmo"
    gguf_arch = "olmo2"
    features = ("rmsnorm", "rope", "gqa", "swiglu", "post_norms", "qk_norm_full")
    rope_mode = 2
    knobs = {"hf_qkv": True, "attn_pre_norm": False, "ffn_pre_norm": False,
             "attn_post_norm": True, "ffn_post_norm": True}
    tensors = {
        **{k: v for k, v in Llama.tensors.items() if k not in _PRE_NORMS},
        "blk.{L}.post_attention_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
        "blk.{L}.post_ffw_norm.weight": "model.layers.{L}.post_feedforward_layernorm.weight",
    }
    space = {"mlp_bias": [False]}  # attention_bias and rope types as llama

    def configure(self, k):
        super().configure(k)
        k["qk_norm"] = "full"


@hookimpl
def porter_architectures():
    return [Olmo2]
