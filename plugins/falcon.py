"""Falcon (rotary and ALiBi variants): LayerNorm with bias, one fused query_key_value, plain GELU MLP.

- falcon-7b layout (``multi_query``): one K and one V head; attention and MLP in parallel on one
  norm (``input_layernorm``), or sequential when ``parallel_attn`` is false (then
  ``post_attention_layernorm`` feeds the MLP).
- ``new_decoder_architecture`` (falcon-40b/180b): grouped fused qkv, ``ln_attn`` and ``ln_mlp``
  (llama.cpp's ``attn_norm_2`` and ``attn_norm``) feeding attention and MLP in parallel, or one
  norm when ``num_ln_in_parallel_attn`` is 1.

The fused qkv holds per kv group [q heads of the group, k, v] (multi-head: [q, k, v] per head);
llama.cpp's converter reorders it to [all q; all k; all v] and porter does the same.
ALiBi variants (``alibi: true``, falcon-rw) use no rope: softmax attention with transformers'
per-head bias (BLOOM slopes times key position, rounded to bfloat16 as transformers does) in an
F32 mask. llama.cpp's falcon has no ALiBi, so such files run in porter only.
"""

from __future__ import annotations

from plugins._common import InterleavedQKV
import math

from porter.plugins import hookimpl

H = "transformer.h.{L}"


class Falcon(InterleavedQKV):
    model_type = "falcon"
    family = "falcon"
    gguf_arch = "falcon"
    features = ("layernorm", "rope", "alibi", "mqa", "gqa", "fused_qkv", "parallel_block", "gelu")
    knobs = {"norm": "layer", "norm_bias": True, "fused_qkv": True, "mlp": "plain",
             "hf_embed": "transformer.word_embeddings", "hf_layers": "transformer.h",
             "hf_attn": "self_attention", "hf_final_norm": "transformer.ln_f"}
    tensors = {
        "token_embd.weight": "transformer.word_embeddings.weight",
        "output_norm.weight": "transformer.ln_f.weight",
        "output_norm.bias": "transformer.ln_f.bias",
        "output.weight": "lm_head.weight",
        "blk.{L}.attn_norm.weight": H + ".input_layernorm.weight",
        "blk.{L}.attn_norm.bias": H + ".input_layernorm.bias",
        # two-norm layout, named as llama.cpp does: attn_norm_2 feeds attention, attn_norm the MLP
        "blk.{L}.attn_norm_2.weight": H + ".ln_attn.weight",
        "blk.{L}.attn_norm_2.bias": H + ".ln_attn.bias",
        "blk.{L}.ffn_norm.weight": H + ".post_attention_layernorm.weight",
        "blk.{L}.ffn_norm.bias": H + ".post_attention_layernorm.bias",
        "blk.{L}.attn_qkv.weight": H + ".self_attention.query_key_value.weight",
        "blk.{L}.attn_qkv.bias": H + ".self_attention.query_key_value.bias",
        "blk.{L}.attn_output.weight": H + ".self_attention.dense.weight",
        "blk.{L}.attn_output.bias": H + ".self_attention.dense.bias",
        "blk.{L}.ffn_up.weight": H + ".mlp.dense_h_to_4h.weight",
        "blk.{L}.ffn_up.bias": H + ".mlp.dense_h_to_4h.bias",
        "blk.{L}.ffn_down.weight": H + ".mlp.dense_4h_to_h.weight",
        "blk.{L}.ffn_down.bias": H + ".mlp.dense_4h_to_h.bias",
    }
    # in the two-norm layout attn_norm is the MLP's norm, ln_mlp
    alternatives = {"blk.{L}.attn_norm.weight": H + ".ln_mlp.weight", "blk.{L}.attn_norm.bias": H + ".ln_mlp.bias"}
    tiny = {"activation": "gelu", "alibi": False, "bias": False}
    # llama.cpp's falcon reads its K/V head count from the key, whatever the layout: the config of
    # the new layout is the one whose num_kv_heads says it
    gguf_config = {"attention.head_count_kv": "num_kv_heads"}
    gguf_implies = {"new_decoder_architecture": True}
    space = {"new_decoder_architecture": [False, True], "multi_query": [True, False],
             "parallel_attn": [True, False], "num_ln_in_parallel_attn": [None, 1], "bias": [False, True],
             "alibi": [False, True]}

    def source_name(self, gguf_name):
        src = super().source_name(gguf_name)
        m = gguf_name.split(".")
        pattern = ".".join(["blk", "{L}", *m[2:]]) if m[0] == "blk" else gguf_name
        if src is None and pattern in self.alternatives:
            alt = self.alternatives[pattern].format(L=m[1])
            src = alt if alt in self.info.parameters else None
        return src

    @property
    def uses_alibi(self) -> bool:
        return bool(self.info.config.get("alibi"))

    def configure(self, k):
        super().configure(k)
        if self.uses_alibi:
            k["rope"], k["alibi"], k["rope_freq_factors"] = False, True, False
        two_norms = self.has("blk.0.attn_norm_2.weight")
        if two_norms:
            k["attn_norm_w"], k["ffn_norm_w"] = "attn_norm_2", "attn_norm"
        k["hf_attn_norm"] = "ln_attn" if two_norms else "input_layernorm"
        k["parallel"] = not self.has("blk.0.ffn_norm.weight")
        k["parallel_ffn_norm"] = two_norms
        k["hf_ffn_norm"] = "ln_mlp" if two_norms else "post_attention_layernorm"
        k["o_bias"] = self.has("blk.0.attn_output.bias")

    def spec_hparams(self):
        values = super().spec_hparams()
        if self.uses_alibi:
            values["alibi_slopes"] = alibi_slopes(self.hp.num_heads)
            values["alibi_bf16"] = True
        return values

    @classmethod
    def tiny_config(cls, **overrides):
        from transformers import AutoConfig

        fields = {"vocab_size": 97, "hidden_size": 64, "ffn_hidden_size": 112, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 256,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
                  "new_decoder_architecture": True, **cls.tiny}
        names = {"intermediate_size": "ffn_hidden_size", "num_key_value_heads": "num_kv_heads"}
        fields.update({names.get(k, k): v for k, v in overrides.items() if k != "head_dim"})
        if fields["new_decoder_architecture"]:
            fields["parallel_attn"] = True  # the new layout is always parallel
        else:  # one K/V head (multi_query) or multi-head: the old layout has no groups
            fields["num_kv_heads"] = 1 if fields.get("multi_query", True) else fields["num_attention_heads"]
        return AutoConfig.for_model(cls.model_type, **fields)


def alibi_slopes(n_head: int) -> list[float]:
    """BLOOM/Falcon ALiBi slopes: powers of 2^(-8/n) for the largest power of two n <= n_head,
    then odd powers of 2^(-4/n) for the remaining heads."""
    n = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 / n * (i + 1)) for i in range(n)]
    slopes += [2.0 ** (-4.0 / n * (2 * i + 1)) for i in range(min(n, n_head - n))]
    return slopes


@hookimpl
def porter_architectures():
    return [Falcon]
