"""Gemma: Llama with a GeGLU MLP (tanh GELU), embeddings scaled by sqrt(hidden) and
``(1 + w)`` RMSNorms.

llama.cpp's ``gemma`` architecture uses neox rope on unpermuted q/k and, like its converter,
porter folds the ``+ 1`` of every norm weight into the stored weight (``transform``).
"""

from __future__ import annotations

import math

import numpy as np

from plugins.llama import Llama
from porter.plugins import hookimpl


class Gemma(Llama):
    model_type = "gemma"
    family = "gemma"
    gguf_arch = "gemma"
    features = ("rmsnorm", "rope", "gqa", "geglu", "embd_scale")
    rope_mode = 2  # neox rope, q/k as in the checkpoint
    knobs = {"hf_qkv": True, "embd_scale": True, "hf_embed": None,
             "hf_embed_scaled": "model.embed_tokens"}  # transformers scales inside embed_tokens
    # llama.cpp's gemma has no output.weight: the head is always the (tied) embedding
    tensors = {k: v for k, v in Llama.tensors.items() if k != "output.weight"}
    tiny = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    space = {
        "attention_bias": [False, True],
        "mlp_bias": [False],  # not a Gemma option
        "rope_parameters": [
            {"rope_type": "default", "rope_theta": 10000.0},
            {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ],
    }

    @classmethod
    def tiny_config(cls, **overrides):
        # llama.cpp's gemma and gemma2 have no output tensor: the head is always the embedding
        if "output.weight" not in cls.tensors:
            overrides["tie_word_embeddings"] = True
        return super().tiny_config(**overrides)

    def configure(self, k):
        super().configure(k)
        if not self.hp.tie_word_embeddings and "output.weight" not in self.tensors:
            from porter.errors import ModelError

            raise ModelError(f"{self.model_type}: an untied lm_head has no place in llama.cpp's "
                             f"{self.gguf_arch} architecture (it reads the head from token_embd)")

    def embd_scale(self) -> float:
        """sqrt(hidden) as transformers computes it: a float32 scalar cast to the weights' dtype."""
        s = np.array([math.sqrt(self.hp.hidden_size)], np.float32)
        dtype = str(self.info.config.get("dtype") or self.info.config.get("torch_dtype") or "float32")
        if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
            b = s.view(np.uint32)
            s = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        elif dtype == "float16":
            s = s.astype(np.float16).astype(np.float32)
        return float(s[0])

    def spec_hparams(self):
        values = super().spec_hparams()
        values["embd_scale"] = self.embd_scale()
        return values

    def gguf_kv(self):
        kv = super().gguf_kv()
        a = self.gguf_arch  # llama.cpp's gemma converters always write the head size
        kv[f"{a}.attention.key_length"] = kv[f"{a}.attention.value_length"] = self.hp.head_dim
        return kv

    def transform(self, gguf_name: str, arrays: list[np.ndarray]) -> np.ndarray:
        w = arrays[0]
        if gguf_name.endswith("norm.weight"):  # (1 + w), folded as llama.cpp's converter does
            return (w.astype(np.float32) + 1.0).astype(w.dtype)
        return w


@hookimpl
def porter_architectures():
    return [Gemma]
