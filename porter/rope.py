"""transformers' rotary-embedding configurations as arguments of ggml's ``rope_ext``.

ggml rotates pair ``i`` (of ``n_dims / 2``) of a head at position ``p`` by the angle::

    theta_i = p * freq_scale * freq_base ** (-2 i / n_dims) / freq_factors[i]

(with YaRN ramp mixing when ``ext_factor != 0``) and multiplies cos and sin by ``attn_factor``
(times ``1 + 0.1 ln(1 / freq_scale)`` when ``ext_factor != 0``). transformers rotates pair ``i``
by ``p * inv_freq[i]`` and multiplies cos and sin by ``attention_scaling``, with ``inv_freq`` and
``attention_scaling`` computed by ``ROPE_INIT_FUNCTIONS[rope_type]`` (or the model's
``compute_default_rope_parameters`` for ``"default"``).

How each ``rope_type`` is expressed (this is the contract :func:`ggml_rope_args` follows):

``default``
    native: ``freq_base = rope_theta``, no factors, ``freq_scale = 1``.
``linear``
    native: ``freq_scale = 1 / factor``.
``llama3``, ``yarn``, ``longrope``, ``dynamic`` (beyond the trained length), ``proportional``
    transformers' own ``inv_freq`` (computed by its ``ROPE_INIT_FUNCTIONS``, so any change
    there is followed) becomes per-pair frequency factors
    ``freq_factors[i] = rope_theta ** (-2 i / n_dims) / inv_freq[i]`` with ``freq_scale = 1``,
    ``ext_factor = 0`` and ``attn_factor = attention_scaling``. Exact up to float32 rounding of
    the factors: this is the universal translation (llama.cpp uses the same mechanism for
    llama3 and longrope). A pair that transformers does not rotate (``inv_freq == 0``, in
    ``proportional``) gets an infinite factor, i.e. angle 0.
``yarn`` with ``native_yarn=True``
    ggml's own YaRN (``ext_factor = 1``, ``freq_scale = 1 / factor``, ``n_ctx_orig``,
    ``beta_fast``/``beta_slow``) with ``attn_factor = attention_scaling / (1 + 0.1 ln factor)``
    to undo ggml's built-in magnitude correction; this is what stock llama.cpp reads from a
    GGUF. It equals transformers' YaRN except that ggml computes the ramp bounds in float32
    (a bound within float32 rounding of an integer may floor differently); transformers'
    ``truncate: false`` has no ggml counterpart and is refused.

Partial rotation (``partial_rotary_factor`` < 1) rotates the first ``int(head_dim * factor)``
dimensions of each head, as GPT-NeoX, Phi, StableLM, Persimmon and the ``ROPE_INIT_FUNCTIONS``
do (an odd count is rounded up to a whole pair, as transformers does). A model whose own default
rope ignores the factor (Llama's ``compute_default_rope_parameters``) must not pass it.

Sequence-length-dependent types (transformers switches on ``max(position_ids) + 1`` of each
forward call, for all positions of that call):

``longrope``
    ``short_factor`` while the sequence is at most ``original_max_position_embeddings``
    long, ``long_factor`` beyond. ``freq_factors`` holds the choice for ``seq_len`` (short when
    ``seq_len`` is not given); both sets are in ``short_freq_factors`` / ``long_freq_factors``
    and :meth:`RopeArgs.freq_factors_for` picks one. (llama.cpp instead picks once per context
    size; note that transformers re-rotates nothing already in a KV cache when it switches.)
``dynamic``
    within ``max_position_embeddings`` plain default rope; beyond it the base grows with the
    sequence length, so the arguments depend on ``seq_len`` (pass it; transformers keeps the
    grown frequencies while a generation continues and resets them for short inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from porter.errors import ShapeError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic", "proportional")


class RopeConfigError(ShapeError):
    """A rope configuration that cannot be expressed with ggml's rope (or is malformed)."""


@dataclass(frozen=True)
class RopeArgs:
    """Arguments of ``ggml_rope_ext`` (and :meth:`porter.runtime.ops.Ops.rope`) reproducing a
    transformers rotary embedding. ``freq_factors`` must be uploaded as an F32 tensor of
    ``n_dims // 2`` entries and passed as the rope's ``freq_factors`` input."""

    rope_type: str
    n_dims: int
    freq_base: float
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: np.ndarray | None = field(default=None, compare=False)
    short_freq_factors: np.ndarray | None = field(default=None, compare=False)
    long_freq_factors: np.ndarray | None = field(default=None, compare=False)
    long_context_threshold: int | None = None  # longrope: long factors when seq_len > this
    note: str = ""

    def freq_factors_for(self, seq_len: int) -> np.ndarray | None:
        """The frequency factors transformers uses for a forward call of ``seq_len`` positions
        (``max(position_ids) + 1``); only longrope depends on it here (for ``dynamic`` call
        :func:`ggml_rope_args` with ``seq_len``)."""
        if self.long_context_threshold is not None and self.long_freq_factors is not None:
            return self.long_freq_factors if seq_len > self.long_context_threshold else self.short_freq_factors
        return self.freq_factors

    def rope_kwargs(self) -> dict:
        """Scalar keyword arguments for :meth:`Ops.rope` (add ``freq_factors`` and ``mode``)."""
        return dict(n_dims=self.n_dims, freq_base=self.freq_base, freq_scale=self.freq_scale,
                    n_ctx_orig=self.n_ctx_orig, ext_factor=self.ext_factor,
                    attn_factor=self.attn_factor, beta_fast=self.beta_fast, beta_slow=self.beta_slow)


class _RopeConfig:
    """The few config attributes transformers' rope functions read (duck-typed)."""

    def __init__(self, params: dict, head_dim: int, max_position_embeddings: int | None):
        self.rope_parameters = params
        self.head_dim = head_dim
        self.hidden_size = head_dim
        self.num_attention_heads = 1
        self.max_position_embeddings = max_position_embeddings

    def standardize_rope_params(self) -> None:  # already standardized by _standardize
        pass


def _standardize(rope_parameters: dict, partial_rotary_factor: float,
                 max_position_embeddings: int | None) -> dict:
    if not isinstance(rope_parameters, dict):
        raise RopeConfigError(f"rope: rope_parameters must be a dict, got {type(rope_parameters).__name__}")
    if rope_parameters and all(isinstance(v, dict) or v is None for v in rope_parameters.values()):
        raise RopeConfigError(
            f"rope: rope_parameters is nested by layer type ({', '.join(rope_parameters)}); "
            "pass the dict of one layer type")
    params = dict(rope_parameters)
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = 10000.0  # transformers' default_theta
    if partial_rotary_factor != 1.0:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    if params["rope_type"] == "yarn":
        params.setdefault("factor", None)  # transformers reads it with [], then derives it when None
    if params["rope_type"] in ("llama3", "yarn", "longrope") and params.get("original_max_position_embeddings") is None:
        if max_position_embeddings is None:
            raise RopeConfigError(
                f"rope: {params['rope_type']} needs original_max_position_embeddings (in rope_parameters) "
                "or max_position_embeddings")
        params["original_max_position_embeddings"] = max_position_embeddings
    return params


def _require(params: dict, *keys: str) -> None:
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise RopeConfigError(f"rope: rope_type {params['rope_type']!r} needs {', '.join(missing)} in rope_parameters")


def _hf_inv_freq(rope_type: str, params: dict, head_dim: int, max_position_embeddings: int | None,
                 seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """transformers' own inverse frequencies (float32 values, returned as float64) and scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS[rope_type]
    config = _RopeConfig(params, head_dim, max_position_embeddings)
    inv_freq, scaling = fn(config, None, seq_len=seq_len)
    return inv_freq.double().numpy(), float(scaling)


def _factors(inv_freq: np.ndarray, base: float, n_dims: int) -> np.ndarray:
    ggml_freq = base ** (-2.0 * np.arange(n_dims // 2, dtype=np.float64) / n_dims)
    with np.errstate(divide="ignore"):
        return (ggml_freq / inv_freq).astype(np.float32)


def ggml_rope_args(rope_parameters: dict, head_dim: int, partial_rotary_factor: float = 1.0,
                   max_position_embeddings: int | None = None, *, seq_len: int | None = None,
                   native_yarn: bool = False) -> RopeArgs:
    """ggml ``rope_ext`` arguments reproducing transformers' rotary embedding for
    ``rope_parameters`` (``config.rope_parameters`` of one layer type) on heads of ``head_dim``.

    ``partial_rotary_factor`` is used when ``rope_parameters`` has none (transformers gives the
    dict's value priority). ``seq_len`` (the forward call's ``max(position_ids) + 1``) matters
    for ``longrope`` and ``dynamic`` only; see the module docstring for every type."""
    head_dim = int(head_dim)
    if head_dim <= 0:
        raise RopeConfigError(f"rope: head_dim must be positive, got {head_dim}")
    params = _standardize(rope_parameters, partial_rotary_factor, max_position_embeddings)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise RopeConfigError(
            f"rope: rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "multi-section (mrope) and axial rotary embeddings need a different ggml op")
    base = float(params["rope_theta"])
    if not base > 1.0:
        raise RopeConfigError(f"rope: rope_theta must be greater than 1, got {base}")
    prf = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    if not 0.0 < prf <= 1.0:
        raise RopeConfigError(f"rope: partial_rotary_factor must be in (0, 1], got {prf}")
    dim = int(head_dim * prf)  # transformers' rotary dimension
    if dim < 1:
        raise RopeConfigError(f"rope: head_dim {head_dim} x partial_rotary_factor {prf} rotates no dimension")
    n_dims = 2 * ((dim + 1) // 2)  # transformers makes ceil(dim / 2) frequencies
    if rope_type == "proportional":
        n_dims = 2 * (head_dim // 2)
    if n_dims > head_dim:
        raise RopeConfigError(f"rope: an odd head_dim {head_dim} cannot be fully rotated by ggml (pairs only)")
    n_ctx_orig = int(params.get("original_max_position_embeddings") or max_position_embeddings or 0)
    common = dict(rope_type=rope_type, n_dims=n_dims, freq_base=base, n_ctx_orig=n_ctx_orig)
    exact_native = n_dims == dim  # ggml's exponent -2i/n_dims equals transformers' -2i/dim

    if rope_type == "default" and exact_native:
        return RopeArgs(**common, note="plain rope")
    if rope_type == "linear" and exact_native:
        _require(params, "factor")
        return RopeArgs(**common, freq_scale=1.0 / float(params["factor"]),
                        note=f"positions interpolated by 1/{params['factor']}")
    if rope_type == "dynamic":
        _require(params, "factor")
        if max_position_embeddings is None:
            raise RopeConfigError("rope: dynamic rope needs max_position_embeddings")
        if seq_len is not None and seq_len > max_position_embeddings and dim <= 2:
            raise RopeConfigError("rope: dynamic rope needs a rotary dimension above 2 (transformers divides by dim - 2)")
        if (seq_len is None or seq_len <= max_position_embeddings) and exact_native:
            return RopeArgs(**common, note=(
                f"dynamic NTK: plain rope up to {max_position_embeddings} positions; for longer "
                "sequences call ggml_rope_args again with seq_len (the base grows with it)"))
    if rope_type == "yarn" and native_yarn:
        return _native_yarn(params, common, dim, n_dims, max_position_embeddings)

    if rope_type in ("default", "linear"):  # odd rotary dimension: go through the factors
        inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)))
        if rope_type == "linear":
            _require(params, "factor")
            inv = inv / np.float32(params["factor"])
        return RopeArgs(**common, freq_factors=_factors(inv.astype(np.float64), base, n_dims),
                        note="odd rotary dimension expressed through frequency factors")

    if rope_type == "llama3":
        _require(params, "factor", "low_freq_factor", "high_freq_factor")
    elif rope_type == "yarn":
        if params.get("factor") is None and max_position_embeddings is None:
            raise RopeConfigError("rope: yarn needs factor or max_position_embeddings")
    elif rope_type == "longrope":
        _require(params, "short_factor", "long_factor")
        for key in ("short_factor", "long_factor"):
            if len(params[key]) != n_dims // 2:
                raise RopeConfigError(
                    f"rope: longrope {key} has {len(params[key])} entries; the rotary dimension {dim} "
                    f"needs {n_dims // 2}")
        if params.get("factor") is None and max_position_embeddings is None:
            raise RopeConfigError("rope: longrope needs factor or max_position_embeddings")

    if rope_type == "longrope":
        orig = int(params["original_max_position_embeddings"])
        inv_short, scaling = _hf_inv_freq(rope_type, params, head_dim, max_position_embeddings)
        inv_long, _ = _hf_inv_freq(rope_type, params, head_dim, max_position_embeddings, seq_len=orig + 1)
        if exact_native:  # inv_freq = 1 / (factor * base**(2i/dim)): the factors are the config's own
            short = np.asarray(params["short_factor"], dtype=np.float32)
            long = np.asarray(params["long_factor"], dtype=np.float32)
        else:
            short, long = _factors(inv_short, base, n_dims), _factors(inv_long, base, n_dims)
        chosen = long if seq_len is not None and seq_len > orig else short
        return RopeArgs(**common, attn_factor=scaling, freq_factors=chosen, short_freq_factors=short,
                        long_freq_factors=long, long_context_threshold=orig, note=(
                            f"longrope: short factors for sequences of at most {orig} positions "
                            f"(max(position_ids) + 1), long factors beyond; freq_factors holds the "
                            f"choice for seq_len={seq_len}"))

    inv, scaling = _hf_inv_freq(rope_type, params, head_dim, max_position_embeddings, seq_len=seq_len)
    if len(inv) != n_dims // 2:  # pragma: no cover - transformers changed its conventions
        raise RopeConfigError(f"rope: transformers made {len(inv)} frequencies, expected {n_dims // 2}")
    kwargs = {}
    if rope_type == "yarn":
        kwargs = dict(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1))
    note = {
        "llama3": "llama3 frequency smoothing as frequency factors",
        "yarn": "YaRN ramp as frequency factors, its magnitude correction as attn_factor",
        "dynamic": f"dynamic NTK for seq_len={seq_len}: recompute for other lengths",
        "proportional": "proportional rope: unrotated pairs have infinite factors (angle 0)",
    }.get(rope_type, "")
    return RopeArgs(**common, attn_factor=scaling, freq_factors=_factors(inv, base, n_dims), note=note, **kwargs)


def _native_yarn(params: dict, common: dict, dim: int, n_dims: int, max_position_embeddings: int | None) -> RopeArgs:
    if n_dims != dim:
        raise RopeConfigError("rope: native yarn needs an even rotary dimension")
    if params.get("truncate", True) is False:
        raise RopeConfigError("rope: yarn with truncate=false has no ggml counterpart; use native_yarn=False")
    orig = int(params["original_max_position_embeddings"])
    factor = params.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise RopeConfigError("rope: yarn needs factor or max_position_embeddings")
        factor = max_position_embeddings / orig
    factor = float(factor)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)
    ggml_mscale = 1.0 + 0.1 * math.log(factor)  # what ggml multiplies in when ext_factor != 0
    return RopeArgs(**common | {"n_ctx_orig": orig}, freq_scale=1.0 / factor, ext_factor=1.0,
                    attn_factor=float(attention) / ggml_mscale,
                    beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                    note="ggml's native YaRN (as stock llama.cpp computes it)")
