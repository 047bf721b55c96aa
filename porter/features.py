"""The documented list of architecture ``features``: the words the support table and ``porter
plugins`` use to say what an architecture has. An Architecture's ``features`` must name entries
of :data:`FEATURES` or of a plugin's ``porter_features`` hook; anything else is rejected when the
architectures load (a typo would otherwise read as a capability)."""

from __future__ import annotations

FEATURES: dict[str, str] = {
    # norms
    "rmsnorm": "RMSNorm", "layernorm": "LayerNorm",
    "norm_no_weight": "norms without weight or bias (OLMo)",
    "post_norm": "norm after each residual add, no pre-norms (bert)",
    "post_norms": "norms on the attention and MLP outputs before the residual add (gemma2, olmo2)",
    "qk_norm": "per-head norm of q and k", "qk_norm_full": "one norm over the whole q and k projections (olmo2)",
    # positions
    "rope": "rotary position embedding", "partial_rotary": "rope on part of each head",
    "longrope": "LongRoPE per-pair frequency factors", "rope_per_layer": "rope settings differ by layer",
    "nope_layers": "layers without rope", "alibi": "ALiBi attention bias",
    "learned_positions": "learned position embeddings (gpt2)", "absolute_positions": "absolute position embeddings (bert)",
    "token_types": "token-type (segment) embeddings",
    # attention
    "gqa": "grouped-query attention", "mqa": "multi-query attention", "fused_qkv": "one fused q/k/v projection",
    "qkv_bias": "biases on q, k and v", "clip_qkv": "q, k and v clamped to a bound (OLMo)",
    "sliding_window": "sliding-window attention", "softcap": "attention or logit soft-capping",
    "encoder": "bidirectional encoder (no causal mask)",
    # MLP
    "swiglu": "gated MLP with SiLU", "geglu": "gated MLP with GELU", "gelu": "GELU activation",
    "relu2": "squared-ReLU activation", "fused_gate_up": "one fused gate/up projection", "moe": "mixture of experts",
    # layout and scaling
    "parallel_block": "attention and MLP read the same input", "parallel_residual": "parallel residual (gpt_neox)",
    "bias": "biases on the projections", "embd_scale": "embeddings scaled by a constant",
    "multipliers": "embedding, residual, attention and logit multipliers (granite)",
    "logit_scale": "logits scaled by a constant",
}
