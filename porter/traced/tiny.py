"""Tiny random instances of any transformers causal LM, for tracing and parity.

Starting from the config class's defaults, every size-like field is shrunk (hidden 64, 2 layers,
4 heads, 2 KV heads, head_dim 16, MLP 128, vocabulary 256, 4 experts of which 2 are used,
sliding window 4 < the 13 traced tokens so the window shows), per-layer lists are cut to two
entries keeping two distinct kinds (sliding + full, dense + sparse...), special token ids are
moved into the vocabulary, nested sub-configs are shrunk the same way. A few types need a
fix-up the generic rules cannot know (``FIXUPS``).
"""

from __future__ import annotations

from typing import Any

from porter.errors import PorterError

SIZES: dict[str, int] = {
    # widths
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embedding_size": 64, "dim": 64, "word_embed_proj_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "encoder_ffn_dim": 128,
    "ffn_hidden_size": 128, "n_inner": 128, "dim_ff": 128, "dff": 128, "d_ff": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64,
    "shared_experts_intermediate_size": 64, "expert_intermediate_size": 64, "mlp_hidden_size": 128,
    "vocab_size": 256, "vocab_size_per_layer_input": 256, "embed_dim": 64,
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
    # linear attention / state spaces
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_n_heads": 4, "mamba_d_state": 16, "mamba_d_head": 16,
    "mamba_chunk_size": 8, "chunk_size": 8, "state_size": 16, "time_step_rank": 8, "mamba_dt_rank": 8,
    "swa_head_dim": 16, "attention_hidden_size": 64, "rotary_dim": 8,
}
# sizes that a config may leave unset by default but the model needs (experts counts)
FILL_IF_NONE = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "num_local_experts", "num_key_value_heads",
                "head_dim")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 3, "unk_token_id": 3,
             "decoder_start_token_id": 1}
LAYERS = 2
# fields of the per-layer-list kind whose length follows num_hidden_layers
PER_LAYER_KINDS = (list, tuple)

# BERT-style architectures whose causal-LM head attends both ways unless told it decodes
ENCODER_STYLE = ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
                 "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
                 "xlm-roberta-xl", "xmod")
FIXUPS: dict[str, dict[str, Any]] = {
    **{t: {"is_decoder": True} for t in ENCODER_STYLE},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 10000.0}},
    "dots3_note_text": {"per_layer_config": {}},
    # LFM2 checkpoints mix short-convolution and attention layers; the config defaults have none of
    # the former (lfm2: every layer attends; lfm2_moe: no list at all)
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # layers that reuse an earlier layer's KV cache: both kinds before the sharing starts
    "gemma3n_text": {"num_hidden_layers": 4, "intermediate_size": [128] * 4, "num_kv_shared_layers": 2,
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
                     "layer_types": ["sliding_attention", "full_attention"] * 2},
}


def _shrink_value(key: str, value: Any, n_layers_before: int | None, vocab: int) -> Any:
    if value is None and key in FILL_IF_NONE:
        return SIZES[key]
    if isinstance(value, bool) or value is None:
        return value
    if key in SIZES and isinstance(value, int):
        return SIZES[key]
    if key.endswith("_token_id") or key.endswith("_token_index") or key in TOKEN_IDS:
        if isinstance(value, int) and value >= vocab:
            return TOKEN_IDS.get(key, 4)
        if isinstance(value, list):
            return [v if not isinstance(v, int) or v < vocab else TOKEN_IDS.get(key, 2) for v in value][:2]
        return value
    if isinstance(value, PER_LAYER_KINDS) and n_layers_before and len(value) == n_layers_before and n_layers_before > LAYERS:
        first = value[0]
        other = next((v for v in value if v != first), None)
        return [first, other] if other is not None else [first] * LAYERS
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
    out = {}
    for k, v in d.items():
        out[k] = _shrink_value(k, v, n_before, vocab)
    if n_before and n_before > LAYERS:
        kept = _kept_layers(d, n_before)
        for k, v in d.items():
            if isinstance(v, dict) and v and all(str(i).isdigit() for i in v):
                out[k] = _shrink_layer_keyed(v, kept)
    if out.get("kv_lora_rank") and "num_attention_heads" in out and "num_key_value_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # latent attention: keys per head
        if "qk_rope_head_dim" in out and "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]  # the rotary tables' width
    if all(k in out for k in ("mamba_n_heads", "mamba_d_head", "hidden_size")) and out.get("mamba_expand"):
        out["mamba_d_head"] = int(out["mamba_expand"] * out["hidden_size"] // out["mamba_n_heads"])
    return out


def _kept_layers(d: dict, n_before: int) -> list[int]:
    """Which original layers the shrunk per-layer lists keep: layer 0 and the first layer that
    differs from it (the rule of :func:`_shrink_value`)."""
    for v in d.values():
        if isinstance(v, PER_LAYER_KINDS) and len(v) == n_before:
            other = next((i for i, x in enumerate(v) if x != v[0]), None)
            if other is not None:
                return [0, other]
    return [0, 1]


def _shrink_layer_keyed(v: dict, kept: list[int]) -> dict:
    """A per-layer dict keyed by layer index (``{"05": {...}}``): the kept layers' entries, at
    their new indices (the keys' zero padding kept)."""
    width = len(str(next(iter(v))))
    by_index = {int(i): x for i, x in v.items()}
    return {str(new).zfill(width): shrink_dict(by_index[old]) if isinstance(by_index[old], dict) else by_index[old]
            for new, old in enumerate(kept) if old in by_index}


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
