"""Mixtral: Mistral with a sparse mixture-of-experts MLP.

The router picks the top-k experts per token; their softmax probabilities are renormalized over
the chosen ones (equal to a softmax over the selected logits). llama.cpp converts Mixtral to its
``llama`` architecture with stacked expert tensors (``ffn_{gate,up,down}_exps``) and the router as
``ffn_gate_inp``; the checkpoint stores one tensor per expert, stacked at conversion.
"""

from __future__ import annotations

from plugins.mistral import Mistral
from porter.plugins import hookimpl


class Mixtral(Mistral):
    model_type = "mixtral"
    family = "llama"
    gguf_arch = "llama"  # llama.cpp's converter maps MixtralForCausalLM to its llama architecture
    features = Mistral.features + ("moe",)
    knobs = {"mlp": "moe", "moe_norm_topk": True}
    tensors = {
        **Mistral.tensors,
        "blk.{L}.ffn_gate_inp.weight": "model.layers.{L}.block_sparse_moe.gate.weight",
    }
    experts = {
        "blk.{L}.ffn_gate_exps.weight": "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
        "blk.{L}.ffn_down_exps.weight": "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
        "blk.{L}.ffn_up_exps.weight": "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    }
    tiny = {"num_local_experts": 4, "num_experts_per_tok": 2}
    space = {
        "num_local_experts": [2, 4, 8],
        "num_experts_per_tok": [1, 2],
        "attention_bias": [False],
        "mlp_bias": [False],
    }

    @classmethod
    def q8_0_overrides(cls, overrides):
        # every expert used: q8_0 noise would flip near-tie top-k choices (a discrete jump that
        # F32 parity checks exactly); the stacked q8_0 experts and mul_mat_id are still exercised
        return {"num_experts_per_tok": overrides.get("num_local_experts", cls.tiny["num_local_experts"])}


@hookimpl
def porter_architectures():
    return [Mixtral]
