"""Tiny random instances of any transformers causal LM, for tracing and parity.

Starting from the config class's defaults, every size-like field is shrunk (hidden 64, 2 layers,
4 heads, 2 KV heads, head_dim 16, MLP 128, vocabulary 256, 4 experts of which 2 are used,
sliding window 4 < the 13 traced tokens so the window shows), per-layer lists are cut to two
entries keeping two distinct kinds (sliding + full, dense + sparse...), the same two original
layers for every list, layer-index lists and per-layer overrides; counts of leading dense layers
leave a sparse one, routing top-k is never raised, and derived sizes that must agree (latent
attention's head_dim, an SSM's heads * head_dim) are made to agree again. Special token ids are
moved into the vocabulary, nested sub-configs are shrunk the same way. A few types need a
fix-up the generic rules cannot know (``FIXUPS``).
"""

from __future__ import annotations

import math
from typing import Any

from porter.errors import PorterError

SIZES: dict[str, int] = {
    # widths
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embedding_size": 64, "dim": 64, "word_embed_proj_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "ffn_hidden_size": 128, "n_inner": 128, "dim_ff": 128, "dff": 128, "d_ff": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64,
    "shared_experts_intermediate_size": 64, "expert_intermediate_size": 64, "mlp_hidden_size": 128,
    "vocab_size": 256, "vocab_size_per_layer_input": 256, "decoder_vocab_size": 256, "embed_dim": 64,
    # depth and heads
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "decoder_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "decoder_attention_heads": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "attention_head_dim": 16, "kv_channels": 16, "d_head": 16, "dim_head": 16,
    # positions
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "model_max_length": 128, "max_sequence_length": 128,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "num_experts_per_token": 2, "moe_k": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "n_shared_experts": 1,
    # windows
    "sliding_window": 4, "sliding_window_size": 4, "local_attention_window_len": 4, "attention_window_size": 4,
    "window_size": 4,
    # multi-head latent attention
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4,
    # a token indexer choosing blocks of keys (budget < the 13 traced tokens so the choice shows)
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
    "indexer_compress_ratio": 2,
    # linear attention / state spaces
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_d_head": 16,
    "mamba_chunk_size": 8, "chunk_size": 8, "state_size": 16, "time_step_rank": 8, "mamba_dt_rank": 8,
    "swa_head_dim": 16, "attention_hidden_size": 64, "rotary_dim": 8,
}
# sizes that a config may leave unset by default but the model needs (experts counts)
FILL_IF_NONE = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "num_local_experts", "num_key_value_heads",
                "head_dim", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget",
                "indexer_compress_ratio")
# counts shrunk but never raised: an architecture routing each token to one expert (or having
# one shared expert) keeps that
NEVER_RAISE = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "n_shared_experts")
# how many leading layers are dense before the sparse (MoE) ones start: at most all but the last,
# so the tiny model has a sparse layer
LEADING_DENSE = ("first_k_dense_replace", "num_dense_layers")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 3, "unk_token_id": 3,
             "decoder_start_token_id": 1}
LAYERS = 2
# fields of the per-layer-list kind whose length follows num_hidden_layers
PER_LAYER_KINDS = (list, tuple)
# names of lists of layer indices (kept layers renumbered, not one entry per layer)
LAYER_INDEX_SUFFIXES = ("moe_layers", "_idxs", "_layer_ids", "only_layers", "sparse_layers", "dense_layers")

# BERT-style architectures whose causal-LM head attends both ways unless told it decodes
ENCODER_STYLE = ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                 "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
                 "xlm-roberta-xl", "xmod")
FIXUPS: dict[str, dict[str, Any]] = {
    **{t: {"is_decoder": True} for t in ENCODER_STYLE},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 10000.0}},
    # LFM2 checkpoints mix short-convolution and attention layers; the config defaults have none of
    # the former (lfm2: every layer attends; lfm2_moe: no default pattern, the model indexes None)
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # its causal-LM head asserts is_decoder (the default is False); the axial position embedding's
    # widths sum to hidden_size and its shape multiplies to max_position_embeddings; attention
    # chunks shorter than the traced tokens so the chunking shows
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 48], "axial_pos_shape": [8, 16],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4},
    # one attention block shared by every hybrid layer: two hybrid layers so there is something
    # to share (transformers refuses a tie with nothing to tie into)
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # layers that reuse an earlier layer's KV cache: both kinds before the sharing starts
    "gemma3n_text": {"num_hidden_layers": 4, "intermediate_size": [128] * 4, "num_kv_shared_layers": 2,
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
                     "layer_types": ["sliding_attention", "full_attention"] * 2},
}


def _shrink_value(key: str, value: Any, kept: list[int] | None, n_layers_before: int | None, vocab: int) -> Any:
    if value is None and key in FILL_IF_NONE:
        return SIZES[key]
    if isinstance(value, bool) or value is None:
        return value
    if key in NEVER_RAISE and isinstance(value, int):
        return min(value, SIZES[key])
    if key in SIZES and isinstance(value, int):
        return SIZES[key]
    if key in LEADING_DENSE and isinstance(value, int):
        return min(value, LAYERS - 1)
    if key.endswith("_token_id") or key.endswith("_token_index") or key in TOKEN_IDS:
        if isinstance(value, int) and value >= vocab:
            return TOKEN_IDS.get(key, 4)
        if isinstance(value, list):
            return [v if not isinstance(v, int) or v < vocab else TOKEN_IDS.get(key, 2) for v in value][:2]
        return value
    if kept and _is_layer_index_list(key, value, n_layers_before):
        return [new for new, old in enumerate(kept) if old in value]
    if isinstance(value, PER_LAYER_KINDS) and kept and len(value) == n_layers_before:
        return [value[i] for i in kept]
    if isinstance(value, dict) and (key.endswith("_config") or key.endswith("config")):
        return shrink_dict(value)
    if isinstance(value, int) and value > 256 and not key.startswith(("rope", "original")):
        return 64
    return value


def shrink_dict(d: dict) -> dict:
    vocab = SIZES["vocab_size"]
    n_before = None
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(d.get(k), int):
            n_before = d[k]
            break
    kept = _kept_layers(d, n_before) if n_before and n_before > LAYERS else None
    out = {}
    for k, v in d.items():
        out[k] = _shrink_value(k, v, kept, n_before, vocab)
    _keep_consistent(d, out)
    if kept:
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("id2label", "label2id") and all(str(i).isdigit() for i in v):
                out[k] = _shrink_layer_keyed(v, kept, d, out)
    return out


def _is_layer_index_list(key: str, value: Any, n_layers: int | None) -> bool:
    """A list naming layers by index (``moe_layers=[0, 1, ...]``, ``full_attn_idxs``), not one
    entry per layer: increasing indices below the layer count, under a name that says so."""
    return (isinstance(value, PER_LAYER_KINDS) and bool(n_layers) and key.endswith(LAYER_INDEX_SUFFIXES)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
            and all(0 <= a < b < n_layers for a, b in zip(value, value[1:]))
            and all(0 <= i < n_layers for i in value))


def _keep_consistent(d: dict, out: dict) -> None:
    """Derived sizes the config validates or the model assumes, made to hold again after the
    shrink (``d`` the original values, ``out`` the shrunk ones, changed in place)."""
    if out.get("kv_lora_rank") and "num_attention_heads" in out and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # latent attention: keys per head
    if out.get("kv_lora_rank") and isinstance(d.get("head_dim"), int) and isinstance(d.get("qk_rope_head_dim"), int):
        # latent attention's head_dim: the rotary width (DeepSeek), or nope + rope (a full
        # query/key head), or some multiple of the rotary width: the same relation, shrunk
        rope, nope = out["qk_rope_head_dim"], out.get("qk_nope_head_dim")
        if d["head_dim"] == d["qk_rope_head_dim"]:
            out["head_dim"] = rope
        elif nope is not None and d["head_dim"] == d.get("qk_nope_head_dim", -1) + d["qk_rope_head_dim"]:
            out["head_dim"] = nope + rope
        else:
            out["head_dim"] = max(rope, rope * d["head_dim"] // d["qk_rope_head_dim"])
    if isinstance(d.get("attention_hidden_size"), int) and isinstance(d.get("hidden_size"), int) \
            and d["attention_hidden_size"] % d["hidden_size"] == 0 and "hidden_size" in out:
        # attention on a multiple of the hidden width (Zamba: the hidden state and the embeddings)
        out["attention_hidden_size"] = out["hidden_size"] * (d["attention_hidden_size"] // d["hidden_size"])
        if isinstance(d.get("attention_head_dim"), int) and isinstance(d.get("num_attention_heads"), int) \
                and d["attention_head_dim"] * d["num_attention_heads"] == d["attention_hidden_size"]:
            out["attention_head_dim"] = out["attention_hidden_size"] // out["num_attention_heads"]
    for heads, d_head in (("mamba_n_heads", "mamba_d_head"), ("n_mamba_heads", "mamba_headdim")):
        if all(k in out for k in (heads, d_head, "hidden_size")) and out.get("mamba_expand"):
            # the SSM's inner width: mamba_d_ssm when set, else expand * hidden; heads * d_head spans it
            inner = out.get("mamba_d_ssm") or int(out["mamba_expand"] * out["hidden_size"])
            out[d_head] = inner // out[heads]
    if all(isinstance(out.get(k), int) for k in ("expand", "num_heads", "head_dim", "hidden_size", "state_size")):
        # Mamba-2 naming: expand * hidden == num_heads * head_dim, the B/C groups dividing the heads
        out["head_dim"] = out["expand"] * out["hidden_size"] // out["num_heads"]
        if isinstance(out.get("n_groups"), int) and out["n_groups"] > 0:
            out["n_groups"] = math.gcd(out["n_groups"], out["num_heads"])


def _kept_layers(d: dict, n_before: int) -> list[int]:
    """Which original layers the shrunk per-layer lists keep, the same for every list: layer 0
    and the first layer that differs from it in the most lists (so with layer kinds
    [full, full, sliding] and MLP kinds [dense, sparse, sparse], layer 2: sliding and sparse)."""
    lists = [v for v in d.values() if isinstance(v, PER_LAYER_KINDS) and len(v) == n_before]
    best, best_differing = 1, 0
    for j in range(1, n_before):
        differing = sum(1 for v in lists if v[j] != v[0])
        if differing > best_differing:
            best, best_differing = j, differing
    return [0, best]


def _shrink_layer_keyed(v: dict, kept: list[int], parent: dict, parent_out: dict) -> dict:
    """A per-layer dict keyed by layer index (``{"05": {...}}``): the kept layers' entries, at
    their new indices (the keys' zero padding kept). An entry overrides the parent config's
    values for its layer, so it is shrunk together with them (a relation between an override and
    an inherited size, e.g. head_dim == nope + rope, still holds), keeping what it sets and what
    now differs from the shrunk parent."""
    width = len(str(next(iter(v))))
    by_index = {int(i): x for i, x in v.items()}
    scalars = {k: x for k, x in parent.items() if not isinstance(x, (dict, list, tuple))}

    def entry(x):
        if not isinstance(x, dict):
            return x
        merged = shrink_dict({**scalars, **x})
        return {k: y for k, y in merged.items() if k in x or (k in parent_out and y != parent_out[k])}

    return {str(new).zfill(width): entry(by_index[old]) for new, old in enumerate(kept) if old in by_index}


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` from its config class's defaults."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise PorterError(f"transformers {_version()} has no model_type {model_type!r}")
    cls = CONFIG_MAPPING[model_type]
    try:
        base = cls().to_dict()
    except Exception as exc:  # noqa: BLE001 - some defaults do not validate
        raise PorterError(f"{model_type}: transformers cannot build its default config ({exc})") from None
    d = shrink_dict(base)
    for k, v in FIXUPS.get(model_type, {}).items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    d.update(overrides)
    for k in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    try:
        return cls.from_dict(d)
    except Exception as exc:  # noqa: BLE001
        raise PorterError(f"{model_type}: the shrunk config does not validate ({exc}); add a fix-up in "
                          "porter/traced/tiny.py") from None


def _version() -> str:
    from importlib.metadata import version

    return version("transformers")


# causal-LM model types whose models take images, audio or speech (research/torch-export-survey.md)
MULTIMODAL = {"dots3_note", "emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "git", "got_ocr2",
              "llama4", "mllama", "moshi", "moss_transcribe_diarize", "musicgen", "musicgen_melody",
              "phi4_multimodal", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "whisper"}

def causal_lm_types() -> list[str]:
    """Every model_type transformers has a causal-LM class for, text-only (multimodal ones,
    ``MULTIMODAL`` or configs with vision/audio sub-configs, left out)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for t in sorted(set(CONFIG_MAPPING) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t]
        if t in MULTIMODAL or "ConditionalGeneration" in cls_name:
            continue
        sub = getattr(CONFIG_MAPPING[t], "sub_configs", {}) or {}
        if any(k in sub for k in ("vision_config", "audio_config", "speech_config", "image_config")):
            continue
        out.append(t)
    return out
