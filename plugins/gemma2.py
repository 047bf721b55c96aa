"""Gemma 2: Gemma with norms before and after each sublayer, soft-capped attention scores
and logits, sliding-window attention on alternate layers, and queries scaled by
``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``."""

from __future__ import annotations

from plugins.gemma import Gemma
from porter.plugins import hookimpl


class Gemma2(Gemma):
    model_type = "gemma2"
    family = "gemma"
    gguf_arch = "gemma2"
    features = Gemma.features + ("post_norms", "softcap", "sliding_window")
    knobs = {"attn_post_norm": True, "ffn_post_norm": True, "mask": "$attn_mask[L]",
             "hf_ffn_norm": "pre_feedforward_layernorm"}
    gguf_config = {"attention.sliding_window": "sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
                   "final_logit_softcapping": "final_logit_softcapping"}
    gguf_unknown = ("query_pre_attn_scalar",)  # llama.cpp derives the attention scale from the model size
    tensors = {
        **Gemma.tensors,
        "blk.{L}.post_attention_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
        "blk.{L}.ffn_norm.weight": "model.layers.{L}.pre_feedforward_layernorm.weight",
        "blk.{L}.post_ffw_norm.weight": "model.layers.{L}.post_feedforward_layernorm.weight",
    }
    tiny = {"sliding_window": 8, "query_pre_attn_scalar": 64}
    space = {
        "sliding_window": [2, 5, 16, 4096],
        # real checkpoints use head_dim or hidden/heads (>= head_dim); smaller values sharpen the
        # softmax of random tiny models until q8_0's 8-bit activations cannot follow
        "query_pre_attn_scalar": [64, 144, 256],
        "attn_logit_softcapping": [None, 50.0, 2.0],
        "final_logit_softcapping": [None, 30.0, 3.0],
    }

    def softcaps(self) -> dict[str, float]:
        x = self.hp.extra
        return {k: float(x[src]) for k, src in (("attn_softcap", "attn_logit_softcapping"),
                                                  ("final_softcap", "final_logit_softcapping")) if x.get(src)}

    def configure(self, k):
        super().configure(k)
        for name in self.softcaps():
            k[name] = True

    def layer_is_sliding(self) -> list[bool]:
        types = self.hp.layer_types or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(self.hp.num_layers)]
        return [bool(self.hp.sliding_window) and t == "sliding_attention" for t in types]

    def spec_hparams(self):
        values = super().spec_hparams()
        values["attn_scale"] = float(self.hp.extra["query_pre_attn_scalar"]) ** -0.5
        values["attn_mask"] = ["kq_mask_swa" if s else "kq_mask" for s in self.layer_is_sliding()]
        if any(self.layer_is_sliding()):
            values["sliding_window"] = int(self.hp.sliding_window)
        values.update(self.softcaps())
        return values

    def gguf_kv(self):
        kv, a, caps = super().gguf_kv(), self.gguf_arch, self.softcaps()
        if self.hp.sliding_window:
            kv[f"{a}.attention.sliding_window"] = int(self.hp.sliding_window)
        if "attn_softcap" in caps:
            kv[f"{a}.attn_logit_softcapping"] = caps["attn_softcap"]
        if "final_softcap" in caps:
            kv[f"{a}.final_logit_softcapping"] = caps["final_softcap"]
        return kv


@hookimpl
def porter_architectures():
    return [Gemma2]
