"""Cohere (Command-R): parallel block (one LayerNorm without bias feeding attention and the
SwiGLU MLP), interleaved rotary (adjacent pairs: ggml's normal rope on unpermuted q/k, as
llama.cpp's command-r does), optional per-head q/k LayerNorm, tied embeddings, logit scale."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Cohere(Llama):
    model_type = "cohere"
    family = "cohere"
    gguf_arch = "command-r"
    features = ("layernorm", "rope", "gqa", "swiglu", "parallel_block", "logit_scale", "qk_norm")
    rope_mode = 0  # interleaved rotary is ggml's normal mode; weights stay as they are
    knobs = {"norm": "layer", "parallel": True, "logit_scale": True, "hf_qkv": True}
    gguf_config = {"logit_scale": "logit_scale"}
    # Command-R ties the LM head to the embeddings (llama.cpp's command-r reads no output.weight)
    tiny = {"tie_word_embeddings": True, "use_qk_norm": False, "logit_scale": 0.0625}
    space = {"use_qk_norm": [False, True], "logit_scale": [0.0625, 1.0, 0.5],
             "attention_bias": [False, True]}

    def transform(self, gguf_name, arrays):
        return arrays[0]

    def spec_hparams(self):
        return {**super().spec_hparams(), "logit_scale": float(self.hp.extra.get("logit_scale", 1.0))}

    def gguf_kv(self):
        return {**super().gguf_kv(), f"{self.gguf_arch}.logit_scale": float(self.hp.extra.get("logit_scale", 1.0))}

    @classmethod
    def tiny_config(cls, **overrides):
        overrides["tie_word_embeddings"] = True
        return super().tiny_config(**overrides)


@hookimpl
def porter_architectures():
    return [Cohere]
