"""GPT-NeoX (Pythia): LayerNorm with bias, parallel residual with two norms (or sequential),
partial rotary (neox layout on the first ``rotary_pct`` of each head), plain GELU MLP.

The fused ``query_key_value`` is interleaved per head ([q, k, v] of head 0, then head 1, ...);
llama.cpp's converter reorders it to [all q; all k; all v] and porter writes it the same way, so
the graph slices q, k and v out of one ``attn_qkv`` product.
"""

from __future__ import annotations

from plugins._common import InterleavedQKV, drop_fields, even_rotary
from porter.plugins import hookimpl


class GPTNeoX(InterleavedQKV):
    model_type = "gpt_neox"
    family = "gpt_neox"
    gguf_arch = "gptneox"
    features = ("layernorm", "rope", "partial_rotary", "parallel_residual", "fused_qkv", "gelu")
    knobs = {"norm": "layer", "norm_bias": True, "fused_qkv": True, "mlp": "plain",
             "hf_embed": "gpt_neox.embed_in", "hf_layers": "gpt_neox.layers", "hf_attn": "attention",
             "hf_final_norm": "gpt_neox.final_layer_norm"}
    gguf_config = {"use_parallel_residual": "use_parallel_residual"}
    tensors = {
        "token_embd.weight": "gpt_neox.embed_in.weight",
        "output_norm.weight": "gpt_neox.final_layer_norm.weight",
        "output_norm.bias": "gpt_neox.final_layer_norm.bias",
        "output.weight": "embed_out.weight",
        "blk.{L}.attn_norm.weight": "gpt_neox.layers.{L}.input_layernorm.weight",
        "blk.{L}.attn_norm.bias": "gpt_neox.layers.{L}.input_layernorm.bias",
        "blk.{L}.attn_qkv.weight": "gpt_neox.layers.{L}.attention.query_key_value.weight",
        "blk.{L}.attn_qkv.bias": "gpt_neox.layers.{L}.attention.query_key_value.bias",
        "blk.{L}.attn_output.weight": "gpt_neox.layers.{L}.attention.dense.weight",
        "blk.{L}.attn_output.bias": "gpt_neox.layers.{L}.attention.dense.bias",
        "blk.{L}.ffn_norm.weight": "gpt_neox.layers.{L}.post_attention_layernorm.weight",
        "blk.{L}.ffn_norm.bias": "gpt_neox.layers.{L}.post_attention_layernorm.bias",
        "blk.{L}.ffn_up.weight": "gpt_neox.layers.{L}.mlp.dense_h_to_4h.weight",
        "blk.{L}.ffn_up.bias": "gpt_neox.layers.{L}.mlp.dense_h_to_4h.bias",
        "blk.{L}.ffn_down.weight": "gpt_neox.layers.{L}.mlp.dense_4h_to_h.weight",
        "blk.{L}.ffn_down.bias": "gpt_neox.layers.{L}.mlp.dense_4h_to_h.bias",
    }
    tiny = {"hidden_act": "gelu"}
    space = {"use_parallel_residual": [True, False], "attention_bias": [True, False],
             "partial_rotary_factor": [0.25, 0.5, 1.0], "hidden_act": ["gelu", "gelu_new", "relu"]}

    @property
    def parallel(self) -> bool:
        return bool(self.hp.extra.get("use_parallel_residual", True))

    def configure(self, k):
        super().configure(k)
        k["parallel"] = k["parallel_ffn_norm"] = self.parallel

    def gguf_kv(self):
        kv = super().gguf_kv()
        kv[f"{self.gguf_arch}.use_parallel_residual"] = self.parallel
        kv.pop(f"{self.gguf_arch}.attention.head_count_kv", None)
        return kv

    @classmethod
    def tiny_config(cls, **overrides):
        fields = dict(overrides)
        hidden, heads = fields.get("hidden_size", 64), fields.get("num_attention_heads", 4)
        even_rotary(fields, hidden // heads)
        if "partial_rotary_factor" in fields:
            fields["rotary_pct"] = fields.pop("partial_rotary_factor")
        # head size is hidden_size / heads, and attention is multi-head only
        return drop_fields(super().tiny_config(**fields), "head_dim", "num_key_value_heads")


@hookimpl
def porter_architectures():
    return [GPTNeoX]
