"""Granite: Llama with four multipliers: embeddings (``embedding_multiplier``), sublayer
outputs before each residual add (``residual_multiplier``), attention scores
(``attention_multiplier`` replaces ``head_dim ** -0.5``) and logits (divided by
``logits_scaling``). llama.cpp's ``granite`` keeps llama's permuted q/k and normal rope."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Granite(Llama):
    model_type = "granite"
    family = "granite"
    gguf_arch = "granite"
    features = Llama.features + ("multipliers",)
    knobs = {"embd_scale": True, "residual_scale": True, "logit_scale": True}
    gguf_config = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                   "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"}
    tiny = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.05,
            "logits_scaling": 8.0}
    space = {
        "embedding_multiplier": [1.0, 12.0],
        "residual_multiplier": [1.0, 0.22],
        "attention_multiplier": [0.0078125, 0.05, 0.25],
        "logits_scaling": [1.0, 8.0],
    }

    def multipliers(self) -> dict[str, float]:
        x = self.hp.extra
        return {"embedding": float(x.get("embedding_multiplier", 1.0)),
                "residual": float(x.get("residual_multiplier", 1.0)),
                "attention": float(x.get("attention_multiplier", 1.0)),
                "logits": float(x.get("logits_scaling", 1.0))}

    def spec_hparams(self):
        values, m = super().spec_hparams(), self.multipliers()
        values.update(embd_scale=m["embedding"], residual_scale=m["residual"], attn_scale=m["attention"],
                      logit_scale=1.0 / m["logits"])
        return values

    def gguf_kv(self):
        kv, a, m = super().gguf_kv(), self.gguf_arch, self.multipliers()
        kv.update({f"{a}.embedding_scale": m["embedding"], f"{a}.residual_scale": m["residual"],
                   f"{a}.attention.scale": m["attention"], f"{a}.logit_scale": m["logits"]})
        return kv


@hookimpl
def porter_architectures():
    return [Granite]
