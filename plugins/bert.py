"""BERT: a bidirectional encoder. Word + absolute position + token-type embeddings, a LayerNorm
on the embeddings, post-LayerNorm layers (norm after each residual add), GELU MLP, biases
everywhere, no rope, no LM head: the output is the final hidden state (``result_embd``).

llama.cpp's ``bert`` architecture: ``token_embd``, ``token_types``, ``position_embd``,
``token_embd_norm``, per layer ``attn_q/k/v``, ``attn_output``, ``attn_output_norm``, ``ffn_up``,
``ffn_down``, ``layer_output_norm``; keys ``bert.attention.causal`` and ``bert.pooling_type``
(from sentence-transformers' ``modules.json`` and ``1_Pooling/config.json``). porter also stores
its own pooling choice (``porter.pooling``, ``porter.normalize``) for ``Model.embed``.
"""

from __future__ import annotations

import json
from pathlib import Path

from porter.arch import Architecture
from porter.plugins import hookimpl

POOLING_TYPES = {"none": 0, "mean": 1, "cls": 2, "last": 3}  # llama.cpp's enum llama_pooling_type


class Bert(Architecture):
    model_type = "bert"
    family = "bert"
    gguf_arch = "bert"
    causal = False
    features = ("layernorm", "encoder", "absolute_positions", "token_types", "post_norm", "gelu")
    ignored_tensors = ("position_ids", "pooler.", "cls.predictions", "cls.seq_relationship")
    knobs = {
        "norm": "layer", "norm_bias": True, "rope": False, "post_norm": True, "mlp": "plain",
        "q_bias": True, "k_bias": True, "v_bias": True, "o_bias": True, "mlp_bias": True,
        "pos_embd": True, "type_embd": True, "embd_norm": True, "lm_head": False, "final_norm": False,
        "hf_embed": "embeddings.word_embeddings", "hf_embd_norm": "embeddings", "hf_layers": "encoder.layer",
        "hf_attn": "attention.output.dense", "hf_qkv": False, "hf_attn_post_norm": "attention",
        "hf_mlp": "output.dense",
    }
    tensors = {
        "token_embd.weight": "embeddings.word_embeddings.weight",
        "token_types.weight": "embeddings.token_type_embeddings.weight",
        "position_embd.weight": "embeddings.position_embeddings.weight",
        "token_embd_norm.weight": "embeddings.LayerNorm.weight",
        "token_embd_norm.bias": "embeddings.LayerNorm.bias",
        "blk.{L}.attn_q.weight": "encoder.layer.{L}.attention.self.query.weight",
        "blk.{L}.attn_q.bias": "encoder.layer.{L}.attention.self.query.bias",
        "blk.{L}.attn_k.weight": "encoder.layer.{L}.attention.self.key.weight",
        "blk.{L}.attn_k.bias": "encoder.layer.{L}.attention.self.key.bias",
        "blk.{L}.attn_v.weight": "encoder.layer.{L}.attention.self.value.weight",
        "blk.{L}.attn_v.bias": "encoder.layer.{L}.attention.self.value.bias",
        "blk.{L}.attn_output.weight": "encoder.layer.{L}.attention.output.dense.weight",
        "blk.{L}.attn_output.bias": "encoder.layer.{L}.attention.output.dense.bias",
        "blk.{L}.attn_output_norm.weight": "encoder.layer.{L}.attention.output.LayerNorm.weight",
        "blk.{L}.attn_output_norm.bias": "encoder.layer.{L}.attention.output.LayerNorm.bias",
        "blk.{L}.ffn_up.weight": "encoder.layer.{L}.intermediate.dense.weight",
        "blk.{L}.ffn_up.bias": "encoder.layer.{L}.intermediate.dense.bias",
        "blk.{L}.ffn_down.weight": "encoder.layer.{L}.output.dense.weight",
        "blk.{L}.ffn_down.bias": "encoder.layer.{L}.output.dense.bias",
        "blk.{L}.layer_output_norm.weight": "encoder.layer.{L}.output.LayerNorm.weight",
        "blk.{L}.layer_output_norm.bias": "encoder.layer.{L}.output.LayerNorm.bias",
    }
    tiny = {"type_vocab_size": 2}
    space = {"hidden_act": ["gelu", "relu"], "type_vocab_size": [1, 2], "layer_norm_eps": [1e-12, 1e-5]}

    def configure(self, k):
        pass  # biases are part of the architecture; no rope, no qk-norm

    def __init__(self, info):
        super().__init__(info)
        # BertModel checkpoints name tensors "embeddings...", BertFor* ones "bert.embeddings..."
        if "bert.embeddings.word_embeddings.weight" in info.parameters:
            self.tensors = {k: "bert." + v for k, v in type(self).tensors.items()}

    def tensor_plans(self):
        plans = super().tensor_plans()
        for p in plans:  # llama.cpp keeps these lookup tables in F32
            p.keep_f32 = p.keep_f32 or p.gguf_name in ("position_embd.weight", "token_types.weight")
        return plans

    def pooling(self) -> tuple[str, bool]:
        """(pooling kind, L2-normalize) from sentence-transformers' modules.json, else none."""
        root = Path(self.info.source)
        try:
            modules = json.loads((root / "modules.json").read_text())
        except (OSError, ValueError):
            return "none", False
        kind, normalize = "none", False
        for m in modules:
            t = str(m.get("type", ""))
            if t.endswith("Pooling"):
                try:
                    cfg = json.loads((root / m.get("path", "") / "config.json").read_text())
                except (OSError, ValueError):
                    cfg = {}
                if cfg.get("pooling_mode_mean_tokens"):
                    kind = "mean"
                elif cfg.get("pooling_mode_cls_token"):
                    kind = "cls"
                elif cfg.get("pooling_mode_lasttoken"):
                    kind = "last"
            elif t.endswith("Normalize"):
                normalize = True
        return kind, normalize

    def gguf_kv(self):
        hp, a = self.hp, self.gguf_arch
        kv = {
            f"{a}.context_length": hp.max_position_embeddings or 512,
            f"{a}.embedding_length": hp.hidden_size,
            f"{a}.feed_forward_length": hp.intermediate_size,
            f"{a}.block_count": hp.num_layers,
            f"{a}.attention.head_count": hp.num_heads,
            f"{a}.attention.layer_norm_epsilon": float(hp.norm_eps),
            f"{a}.attention.causal": False,
        }
        kind, normalize = self.pooling()
        kv[f"{a}.pooling_type"] = POOLING_TYPES[kind]
        kv["porter.pooling"] = kind
        kv["porter.normalize"] = normalize
        return kv

    @classmethod
    def tiny_config(cls, **overrides):
        # the shared shape space speaks llama: bert has no KV heads, head_dim or rope settings,
        # and its head_dim is hidden / heads
        head_dim = overrides.pop("head_dim", None)
        for name in ("num_key_value_heads", "rope_parameters", "tie_word_embeddings"):
            overrides.pop(name, None)
        if head_dim is not None:
            overrides["hidden_size"] = head_dim * overrides.get("num_attention_heads", 4)
        config = super().tiny_config(**overrides)
        for name in ("num_key_value_heads", "head_dim"):  # the base defaults; BertConfig has neither
            if hasattr(config, name):
                delattr(config, name)
        return config


@hookimpl
def porter_architectures():
    return [Bert]
