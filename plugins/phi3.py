"""Phi-3: Mistral's decoder (RMSNorm, GQA, optional sliding window) with a fused qkv projection
and a fused [gate; up] MLP projection, neox rope (optionally partial) and LongRoPE scaling.

llama.cpp stores both fused tensors as they are (``attn_qkv``, ``ffn_up`` holding [gate; up]) and
writes LongRoPE's two factor sets as ``rope_factors_short`` / ``rope_factors_long``; porter writes
the same. LongRoPE limitation: transformers picks the short factors while a forward call's
sequence is at most ``original_max_position_embeddings`` and the long ones beyond (per call);
llama.cpp picks once per context size. porter's graph uses the short factors (inline in its
spec), so it equals transformers for sequences within ``original_max_position_embeddings``;
the parity space keeps its sequences there.
"""

from __future__ import annotations

import numpy as np

from plugins._common import even_rotary
from plugins.mistral import Mistral
from porter.convert.plan import TensorPlan
from porter.plugins import hookimpl

ORIG_CTX = 64  # tiny models' original_max_position_embeddings: parity sequences stay within it


class Phi3(Mistral):
    model_type = "phi3"
    family = "phi"
    gguf_arch = "phi3"
    features = ("rmsnorm", "rope", "gqa", "swiglu", "fused_qkv", "fused_gate_up", "longrope", "sliding_window")
    rope_mode = 2  # neox rope on unpermuted q/k, as llama.cpp's phi3 does
    ROPE_FACTORS_IN_GGUF = ()  # llama.cpp reads rope_factors_short/long, not rope_freqs
    knobs = {"fused_qkv": True, "fused_gate_up": True, "hf_qkv": True}
    gguf_config = {"attention.sliding_window": "sliding_window"}  # 0: none
    tensors = {
        **{k: v for k, v in Mistral.tensors.items() if not any(
            r in k for r in ("attn_q.", "attn_k.", "attn_v.", "ffn_gate", "ffn_up"))},
        "blk.{L}.attn_qkv.weight": "model.layers.{L}.self_attn.qkv_proj.weight",
        "blk.{L}.attn_qkv.bias": "model.layers.{L}.self_attn.qkv_proj.bias",
        "blk.{L}.ffn_up.weight": "model.layers.{L}.mlp.gate_up_proj.weight",
    }
    tiny = {"longrope": False}
    space = {"longrope": [False, True], "partial_rotary_factor": [1.0, 0.75, 0.5],
             "attention_bias": [False, True], "sliding_window": [None, 2, 5, 16],
             # Phi-3 accepts default and longrope only (longrope comes through the "longrope" switch)
             "rope_parameters": [{"rope_type": "default", "rope_theta": 10000.0},
                                 {"rope_type": "default", "rope_theta": 250000.0}]}

    def configure(self, k):
        super().configure(k)
        k["qkv_bias"] = self.has("blk.0.attn_qkv.bias")
        k["o_bias"] = self.has("blk.0.attn_output.bias")

    @property
    def longrope(self) -> bool:
        return (self.hp.rope or {}).get("rope_type") == "longrope"

    def tensor_plans(self):
        plans = super().tensor_plans()
        if self.longrope:
            r = self.rope_args()
            for which, f in (("long", r.long_freq_factors), ("short", r.short_freq_factors)):
                plans.append(TensorPlan(gguf_name=f"rope_factors_{which}.weight", sources=[], keep_f32=True,
                                        transform=lambda _a, f=f: np.asarray(f, np.float32)))
        return plans

    def gguf_kv(self):
        kv, a = super().gguf_kv(), self.gguf_arch
        kv[f"{a}.attention.sliding_window"] = int(self.hp.sliding_window or 0)  # 0: none (llama.cpp's convention)
        for key in ("rope.scaling.type", "rope.scaling.factor"):
            kv.pop(f"{a}.{key}", None)
        if self.longrope:
            r = self.rope_args()
            kv[f"{a}.rope.scaling.attn_factor"] = float(r.attn_factor)
            kv[f"{a}.rope.scaling.original_context_length"] = int(r.n_ctx_orig)
        return kv

    @classmethod
    def tiny_config(cls, **overrides):
        fields = dict(overrides)
        hd = fields.get("hidden_size", 64) // fields.get("num_attention_heads", 4)
        even_rotary(fields, hd)
        prf = fields.pop("partial_rotary_factor", 1.0)
        rope = {**fields.pop("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
                "partial_rotary_factor": prf}
        if fields.pop("longrope", False):
            n = int(hd * prf) // 2
            rope.update(rope_type="longrope", original_max_position_embeddings=ORIG_CTX,
                        short_factor=np.linspace(1.0, 2.5, n).round(3).tolist(),
                        long_factor=np.linspace(1.0, 9.0, n).round(3).tolist())
            fields["original_max_position_embeddings"] = ORIG_CTX
        config = super().tiny_config(rope_parameters=rope, **fields)
        if "head_dim" in vars(config):
            delattr(config, "head_dim")  # transformers validates the rotary size with hidden_size / heads
        return config


@hookimpl
def porter_architectures():
    return [Phi3]
