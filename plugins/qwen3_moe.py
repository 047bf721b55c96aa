"""Qwen3-MoE: Qwen3 (qk-norm) with a sparse mixture-of-experts MLP in every layer.

The top-k probabilities are renormalized only when the config sets ``norm_topk_prob``. llama.cpp
calls the architecture ``qwen3moe``: stacked expert tensors (``ffn_{gate,up,down}_exps``), the
router as ``ffn_gate_inp``, and ``expert_feed_forward_length`` for the experts' width.
"""

from __future__ import annotations

from plugins.qwen3 import Qwen3
from porter.plugins import hookimpl


class Qwen3Moe(Qwen3):
    model_type = "qwen3_moe"
    family = "qwen"
    gguf_arch = "qwen3moe"
    features = Qwen3.features + ("moe",)
    knobs = {"mlp": "moe"}
    gguf_config = {"expert_feed_forward_length": "moe_intermediate_size", "expert_weights_norm": "norm_topk_prob"}
    tensors = {**Qwen3.tensors, "blk.{L}.ffn_gate_inp.weight": "model.layers.{L}.mlp.gate.weight"}
    experts = {
        "blk.{L}.ffn_gate_exps.weight": "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
        "blk.{L}.ffn_up_exps.weight": "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
        "blk.{L}.ffn_down_exps.weight": "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
    }
    # every layer sparse (decoder_sparse_step 1, no mlp_only_layers)
    tiny = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}
    space = {
        "num_experts": [2, 4, 8],
        "num_experts_per_tok": [1, 2],
        "moe_intermediate_size": [16, 24, 40],
        "norm_topk_prob": [False, True],
    }

    def configure(self, k):
        super().configure(k)
        k["moe_norm_topk"] = bool(self.hp.extra.get("norm_topk_prob", False))

    def gguf_kv(self):
        kv = super().gguf_kv()
        a = self.gguf_arch
        kv[f"{a}.expert_feed_forward_length"] = int(self.hp.extra["moe_intermediate_size"])
        kv[f"{a}.expert_weights_norm"] = bool(self.hp.extra.get("norm_topk_prob", False))
        return kv

    @classmethod
    def q8_0_overrides(cls, overrides):
        # every expert used (see Mixtral.q8_0_overrides); expert rows of whole q8_0 blocks
        return {"num_experts_per_tok": overrides.get("num_experts", cls.tiny["num_experts"]),
                "moe_intermediate_size": 64}


@hookimpl
def porter_architectures():
    return [Qwen3Moe]
