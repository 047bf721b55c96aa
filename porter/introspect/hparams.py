"""Normalized hyperparameters: one spelling for what transformers configs call many names.

``hparams_from_config`` reads a transformers ``PretrainedConfig`` (or a plain ``config.json``
dict) and returns :class:`HParams`. It needs no torch and no model. A few facts are visible only
in a model's parameters or module classes (Qwen2's q/k/v biases, Qwen3's q/k norms, whether a
``norm_epsilon`` belongs to an RMSNorm or a LayerNorm); pass ``parameters`` (name -> shape) and
``modules`` ((path, class name) pairs) to take them into account, as
:func:`porter.introspect.introspect` does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

__all__ = ["HParams", "hparams_from_config", "normalize_activation", "ACTIVATIONS"]

# transformers activation name (ACT2FN key) -> porter's name. The tanh approximations of GELU
# (gelu_new, gelu_fast, gelu_accurate, gelu_pytorch_tanh) are the same function written in
# different ways; "gelu" and "gelu_python" are the exact (erf) GELU.
ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "quick_gelu": "gelu_quick",
    "gelu_quick": "gelu_quick",
    "gelu_10": "gelu_clipped",
    "relu": "relu",
    "relu2": "relu2",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "linear": "identity",
    "identity": "identity",
    "mish": "mish",
    "hardswish": "hardswish",
    "laplace": "laplace",
    "prelu": "prelu",
    "xielu": "xielu",
    "sqrtsoftplus": "sqrtsoftplus",
}


def normalize_activation(name: str | None) -> str:
    """Map a transformers activation name to porter's name; unknown names are returned lowercased."""
    if not name:
        return ""
    raw = str(name).strip().lower()
    return ACTIVATIONS.get(raw, raw)


@dataclass(frozen=True)
class HParams:
    """Hyperparameters under one spelling, whatever the config calls them.

    Values the config leaves implicit are resolved the way transformers' modeling code resolves
    them (``head_dim`` = hidden/heads, GPT-2's ``n_inner=None`` = 4*hidden, Falcon's
    ``multi_query`` = one KV head, Qwen2's ``use_sliding_window=False`` = no window).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int | None
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    norm_kind: str
    hidden_act: str
    hidden_act_raw: str
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    rope: dict | None
    rope_by_layer_type: dict[str, dict] | None
    partial_rotary_factor: float
    sliding_window: int | None
    layer_types: tuple[str, ...] | None
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    extra: dict = field(default_factory=dict)

    @property
    def rotary_dim(self) -> int:
        """Number of rotated dimensions per head (``head_dim * partial_rotary_factor``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def to_json(self) -> dict:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


# ----------------------------------------------------------------------------------------------
# Config spellings. The first present, non-None key wins.

_VOCAB = ("vocab_size", "n_vocab", "padded_vocab_size")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "n_embed")
_INTERMEDIATE = ("intermediate_size", "ffn_hidden_size", "ffn_dim", "n_inner", "d_ff", "inner_hidden_size")
_LAYERS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num")
_EPS = (
    ("rms_norm_eps", "rms"),
    ("rms_norm_epsilon", "rms"),
    ("rmsnorm_eps", "rms"),
    ("layer_norm_eps", "layer"),
    ("layer_norm_epsilon", "layer"),
    ("layernorm_epsilon", "layer"),
    ("layernorm_eps", "layer"),
    ("norm_epsilon", None),
    ("norm_eps", None),
    ("epsilon", None),
)
# hidden_activation first: Gemma 2/3 configs carry it and their MLPs read it.
_ACT = (
    "hidden_activation", "hidden_act", "activation_function", "activation", "hidden_activation_fn",
    "ffn_act", "afn", "ff_activation", "mlp_hidden_act",
)
_MAX_POS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_ATTN_BIAS = ("attention_bias", "qkv_bias", "use_qkv_bias", "add_qkv_bias", "use_bias", "bias", "add_bias_linear")
_MLP_BIAS = ("mlp_bias", "use_bias", "bias", "add_bias_linear", "ffn_bias", "use_mlp_bias")
_QK_NORM = ("qk_layernorm", "use_qk_norm", "qk_norm", "use_qk_layernorm", "qk_layer_norms")
_NUM_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "n_experts_per_tok")

# Keys that are normalized into named HParams fields (kept out of ``extra``).
_NORMALIZED = set(
    _VOCAB + _HIDDEN + _INTERMEDIATE + _LAYERS + _HEADS + _KV_HEADS + _ACT + _MAX_POS
    + _ATTN_BIAS + _MLP_BIAS + _QK_NORM
    + tuple(k for k, _ in _EPS)
) | {
    "model_type", "head_dim", "multi_query", "new_decoder_architecture", "tie_word_embeddings",
    "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_pct",
    "rotary_dim", "rotary_emb_base", "sliding_window", "use_sliding_window", "layer_types",
    "bos_token_id", "eos_token_id", "pad_token_id",
}

# Bookkeeping and training-only keys: not hyperparameters of the computation.
_BOILERPLATE = {
    "transformers_version", "architectures", "output_hidden_states", "output_attentions",
    "return_dict", "dtype", "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "id2label", "label2id", "use_cache", "initializer_range", "initializer_factor",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "router_z_loss_coef",
    "tokenizer_class", "prefix", "finetuning_task", "task_specific_params", "auto_map",
    "quantization_config", "pruned_heads", "torchscript", "tf_legacy_loss", "use_bfloat16",
    "gradient_checkpointing", "num_labels", "return_dict_in_generate", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
}


def _as_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        ns = SimpleNamespace(**{k: _as_config(v) if k == "text_config" else v for k, v in config.items()})
        ns._is_dict = True
        ns._dict = dict(config)
        return ns
    return config


def _config_dict(config: Any) -> dict:
    if getattr(config, "_is_dict", False):
        return dict(config._dict)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return dict(vars(config))


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def _get(config: Any, key: str, default: Any = None) -> Any:
    """getattr that tolerates transformers 5 heterogeneous configs.

    With ``per_layer_config`` overrides, reading a per-layer attribute globally raises
    ``AmbiguousGlobalPerLayerAttributeError``; the global (default-layer) value is returned
    instead, and the overrides are reported in ``extra["per_layer_config"]``.
    """
    try:
        return getattr(config, key, default)
    except RuntimeError:
        raw = getattr(config, "_getattr_without_heterogeneous_validation", None)
        if callable(raw):
            try:
                return raw(key, default)
            except Exception:
                return default
        return default


def _first(config: Any, keys: Iterable[str], default: Any = None) -> Any:
    for key in keys:
        value = _get(config, key, None)
        if value is not None:
            return value
    return default


def _first_key(config: Any, keys: Iterable[str]) -> tuple[str | None, Any]:
    for key in keys:
        value = _get(config, key, None)
        if value is not None:
            return key, value
    return None, None


def _scalar_or_scalar_list(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(v is None or isinstance(v, (bool, int, float, str)) for v in value)
    return False


def _split_rope(config: Any) -> tuple[dict | None, dict[str, dict] | None]:
    """(rope for global/default layers, rope by layer type or None)."""
    params = _get(config, "rope_parameters", None)
    if params is None:
        # transformers < 5 spellings, for plain dicts from old config.json files.
        scaling = _get(config, "rope_scaling", None)
        theta = _first(config, ("rope_theta", "rotary_emb_base", "rope_base"))
        if scaling is None and theta is None:
            return None, None
        params = dict(scaling or {})
        if theta is not None:
            params.setdefault("rope_theta", theta)
        params.setdefault("rope_type", params.pop("type", "default"))
    params = dict(params)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        by_type = {k: dict(v) for k, v in params.items()}
        default = by_type.get("full_attention") or by_type.get("global")
        if default is None:  # e.g. {"sliding_attention": ..., "indexed_attention": ...}
            default = next((v for k, v in by_type.items() if "sliding" not in k), next(iter(by_type.values())))
        return dict(default), by_type
    return params, None


def _has_rope(config: Any, model_type: str) -> bool:
    if _get(config, "alibi", False):  # falcon with alibi keeps a rope_parameters default
        return False
    pos = _get(config, "position_embedding_type", None)
    if isinstance(pos, str) and pos not in ("rope", "rotary"):
        return False
    return True


def _linear_biases(parameters: Mapping[str, tuple]) -> tuple[bool, bool]:
    """(attention has a linear bias, MLP has a linear bias), from parameter names and shapes.

    A bias counts when its sibling ``.weight`` is a matrix (a Linear or GPT-2 Conv1D, not a
    norm) and it sits inside a numbered layer. Inside a layer, paths with an ``attn`` /
    ``attention`` component are attention; everything else is the MLP (BERT's ``output.dense``,
    GPT-2's ``mlp.c_fc``, MoE experts).
    """
    attn = mlp = False
    for name, shape in parameters.items():
        if not name.endswith(".bias"):
            continue
        base = name[: -len(".bias")]
        weight = parameters.get(base + ".weight")
        if weight is None or len(weight) < 2:
            continue
        parts = base.split(".")
        if not any(p.isdigit() for p in parts):
            continue
        if any("attn" in p.lower() or "attention" in p.lower() for p in parts):
            attn = True
        else:
            mlp = True
    return attn, mlp


_QK_NORM_RE = re.compile(
    r"(^|\.)(q_norm|k_norm|q_layernorm|k_layernorm|query_layernorm|key_layernorm|q_ln|k_ln|"
    r"query_norm|key_norm)\."
)


# Activation module classes -> porter's name (for configs that do not name their activation).
_ACT_MODULES = {
    "SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh", "QuickGELUActivation": "gelu_quick",
    "ReLU": "relu", "ReLUSquaredActivation": "relu2", "ReLU6": "relu6",
    "GELU": "gelu",  # torch.nn.GELU; its default (approximate="none") is the erf form
    "BloomGelu": "gelu_tanh",
}


def _act_from_modules(modules: Iterable[tuple[str, str]]) -> str | None:
    found = Counter(_ACT_MODULES[cls] for _, cls in modules if cls in _ACT_MODULES)
    return found.most_common(1)[0][0] if found else None


def _uniform_int(value: Any) -> tuple[int | None, list | None]:
    """(int, None) for a number or a list of equal numbers; (None, list) for a per-layer list."""
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        if items and all(v == items[0] for v in items) and len(items) == len(value):
            return int(items[0]), None
        return None, list(value)
    if value is None or isinstance(value, bool):
        return None, None
    return int(value), None


def _norm_kind_from_modules(modules: Iterable[tuple[str, str]]) -> str | None:
    kinds: Counter[str] = Counter()
    for path, cls in modules:
        leaf = path.rsplit(".", 1)[-1]
        if _QK_NORM_RE.search(leaf + "."):
            continue
        low = cls.lower()
        if "rmsnorm" in low or "rms_norm" in low:
            kinds["rms"] += 1
        elif "layernorm" in low or "layer_norm" in low:
            kinds["layer"] += 1
    if not kinds:
        return None
    return kinds.most_common(1)[0][0]


def hparams_from_config(
    config: Any,
    *,
    parameters: Mapping[str, tuple[int, ...]] | None = None,
    modules: Iterable[tuple[str, str]] | None = None,
) -> HParams:
    """Normalize a transformers config (``PretrainedConfig`` or ``config.json`` dict) into HParams.

    ``parameters`` (name -> shape) adds what only parameter names show: q/k norms and linear
    biases. ``modules`` ((path, class name)) settles ``norm_kind`` from the norm classes used.
    For multimodal configs the text (decoder) config is described.
    """
    top = _as_config(config)
    cfg = _as_config(_text_config(top))

    model_type = str(_get(cfg, "model_type", None) or _get(top, "model_type", "") or "")
    hidden = int(_first(cfg, _HIDDEN, 0) or 0)
    heads, heads_per_layer = _uniform_int(_first(cfg, _HEADS, 0))
    heads = heads or 0
    layers = int(_first(cfg, _LAYERS, 0) or 0)

    # Intermediate size: GPT-2 / GPT-J / CodeGen leave n_inner None meaning 4 * hidden.
    inter_raw = _first(cfg, _INTERMEDIATE)
    if inter_raw is None and "n_inner" in _config_dict(cfg) and hidden:
        inter_raw = 4 * hidden
    inter, inter_per_layer = _uniform_int(inter_raw)  # gemma3n: one size per layer

    # KV heads. Falcon: multi_query means 1 KV head unless new_decoder_architecture.
    # GPT-BigCode: multi_query means 1 KV head.
    kv = _first(cfg, _KV_HEADS)
    if _get(cfg, "multi_query", False) and not _get(cfg, "new_decoder_architecture", False):
        kv = 1
    kv, kv_per_layer = _uniform_int(kv)
    if kv is None:
        kv = heads

    head_dim = _get(cfg, "head_dim", None)
    if head_dim is None:
        head_dim = hidden // heads if heads else 0
    head_dim = int(head_dim)

    # Norm epsilon and a first guess at the norm kind from the key's spelling.
    eps_key, eps = None, None
    kind_guess = None
    for key, kind in _EPS:
        value = _get(cfg, key, None)
        if value is not None:
            eps_key, eps, kind_guess = key, float(value), kind
            break
    norm_kind = kind_guess or "layer"
    if modules is not None:
        norm_kind = _norm_kind_from_modules(modules) or norm_kind

    act_key, act_raw = _first_key(cfg, _ACT)
    act_raw = "" if act_raw is None else str(act_raw)
    act = normalize_activation(act_raw)
    if not act and modules is not None:
        act = _act_from_modules(modules) or ""
        if act:
            act_key = "<module classes>"

    max_pos = _first(cfg, _MAX_POS)
    max_pos = int(max_pos) if isinstance(max_pos, (int, float)) else None

    tie = _get(top, "tie_word_embeddings", None)
    if tie is None:
        tie = _get(cfg, "tie_word_embeddings", False)

    # Rope.
    if _has_rope(cfg, model_type):
        rope, rope_by_type = _split_rope(cfg)
    else:
        rope, rope_by_type = None, None
    partial = None
    if rope is not None:
        partial = rope.get("partial_rotary_factor")
    if partial is None:
        partial = _first(cfg, ("partial_rotary_factor", "rotary_pct"))
    if partial is None and _get(cfg, "rotary_dim", None) and head_dim:
        partial = _get(cfg, "rotary_dim") / head_dim
    partial = float(partial) if partial is not None else 1.0

    # Sliding window: Qwen2-style configs keep a window value that is off unless use_sliding_window.
    window = _get(cfg, "sliding_window", None)
    if _get(cfg, "use_sliding_window", True) is False:
        window = None
    window = int(window) if isinstance(window, (int, float)) and not isinstance(window, bool) else None

    layer_types = _get(cfg, "layer_types", None)
    layer_types = tuple(str(t) for t in layer_types) if layer_types is not None else None

    # Biases and qk-norm: config flags, then parameter names.
    attention_bias = any(bool(_get(cfg, k, False)) for k in _ATTN_BIAS)
    mlp_bias = any(bool(_get(cfg, k, False)) for k in _MLP_BIAS)
    qk_norm = any(bool(_get(cfg, k, False)) for k in _QK_NORM)
    if parameters is not None:
        p_attn, p_mlp = _linear_biases(parameters)
        attention_bias = attention_bias or p_attn
        mlp_bias = mlp_bias or p_mlp
        qk_norm = qk_norm or any(_QK_NORM_RE.search(name) for name in parameters)

    def token(key: str) -> Any:
        value = _get(cfg, key, None)
        if value is None and cfg is not top:
            value = _get(top, key, None)
        return value

    # Extra: every other scalar (or list of scalars) of the (text) config, verbatim.
    raw = _config_dict(cfg)
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NORMALIZED or key in _BOILERPLATE or key.startswith("_"):
            continue
        if key.endswith("dropout") or key.endswith("pdrop") or key.endswith("_dropout_prob"):
            continue
        if _scalar_or_scalar_list(value):
            extra[key] = list(value) if isinstance(value, tuple) else value
    if inter_per_layer is not None:
        extra["intermediate_size_per_layer"] = inter_per_layer
    if heads_per_layer is not None:
        extra["num_heads_per_layer"] = heads_per_layer
    if kv_per_layer is not None:
        extra["num_kv_heads_per_layer"] = kv_per_layer
    per_layer = raw.get("per_layer_config")
    if isinstance(per_layer, Mapping) and per_layer:
        extra["per_layer_config"] = {
            int(k) if str(k).isdigit() else k: dict(v) if isinstance(v, Mapping) else v
            for k, v in per_layer.items()
        }
    if eps_key is not None:
        extra.setdefault("norm_eps_key", eps_key)
    if act_key is not None and act_key != "hidden_act":
        extra.setdefault("hidden_act_key", act_key)
    # MoE counts under one spelling too (the verbatim keys stay).
    n_exp = _first(cfg, _NUM_EXPERTS)
    if isinstance(n_exp, int) and not isinstance(n_exp, bool):
        extra.setdefault("num_experts", n_exp)
    top_k = _first(cfg, _TOP_K)
    if isinstance(top_k, int) and not isinstance(top_k, bool) and n_exp:
        extra.setdefault("num_experts_per_tok", top_k)

    return HParams(
        model_type=model_type,
        vocab_size=int(_first(cfg, _VOCAB, 0) or 0),
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        norm_eps=eps if eps is not None else 1e-5,
        norm_kind=norm_kind,
        hidden_act=act,
        hidden_act_raw=act_raw,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(tie),
        rope=rope,
        rope_by_layer_type=rope_by_type,
        partial_rotary_factor=partial,
        sliding_window=window,
        layer_types=layer_types,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        qk_norm=qk_norm,
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("pad_token_id"),
        extra=extra,
    )
