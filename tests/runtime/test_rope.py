"""ggml's rope (Ops.rope) and porter.rope.ggml_rope_args against transformers' rotary embeddings.

Accuracy: rope angles are ``position * frequency`` in float32 on both sides, so an angle carries an
absolute rounding error of a few ulps of the position; the bound is therefore
``ROPE_RTOL + ROPE_POS_ULPS * 2**-24 * max_position`` (max-relative over the rotated tensor),
which is about 1e-5 for positions below 64 and grows linearly beyond (transformers' own float32
rotary embedding carries the same kind of error against float64; ggml is compared with both).
Over 500 examples per test the worst errors were about a third of the bound (9e-5 at position
~2000).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ophelpers import check, max_rel, rng_for, run
from porter.errors import ShapeError
from porter.rope import RopeConfigError, ggml_rope_args
from porter.runtime.ops import ROPE_NEOX, ROPE_NORMAL

ROPE_RTOL = 3e-6
ROPE_POS_ULPS = 2
seeds = st.integers(0, 2**32 - 1)


def rope_bound(max_pos: int) -> float:
    return ROPE_RTOL + ROPE_POS_ULPS * 2.0 ** -24 * max(max_pos, 1)


def ggml_rope(backend, x: np.ndarray, pos: np.ndarray, mode: int, freq_factors=None, **kw) -> np.ndarray:
    """x numpy (n_tokens, n_head, head_dim), positions (n_tokens,) -> rotated x."""
    def build(g):
        ff = None if freq_factors is None else g.input(np.ascontiguousarray(freq_factors, dtype=np.float32))
        return g.ops.rope(g.input(x), g.input(pos.astype(np.int32)), mode=mode, freq_factors=ff, **kw)

    return run(backend, build).reshape(x.shape)


# -- ggml's rope formula (numpy float64), including its YaRN ramp -----------------------------------

def numpy_rope(x, pos, n_dims, mode, freq_base, freq_scale, freq_factors, ext_factor, attn_factor,
               beta_fast, beta_slow, n_ctx_orig):
    """ggml's documented rope in float64 (ggml-cpu: rope_yarn / ggml_rope_yarn_corr_dims)."""
    half = n_dims // 2
    i = np.arange(half, dtype=np.float64)
    theta_extrap = pos[:, None].astype(np.float64) * freq_base ** (-2.0 * i / n_dims)[None, :]
    if freq_factors is not None:
        theta_extrap = theta_extrap / freq_factors[:half].astype(np.float64)[None, :]
    theta_interp = freq_scale * theta_extrap
    theta, mscale = theta_interp, attn_factor
    if ext_factor != 0.0:
        def corr_dim(n_rot):
            return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(freq_base))

        low = max(0.0, math.floor(corr_dim(beta_fast)))
        high = min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
        y = (i - low) / max(0.001, high - low)
        ramp = (1 - np.clip(y, 0, 1)) * ext_factor
        theta = theta_interp * (1 - ramp) + theta_extrap * ramp
        mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    cos, sin = np.cos(theta) * mscale, np.sin(theta) * mscale  # (n_tokens, half)
    out = x.astype(np.float64).copy()
    c, s = cos[:, None, :], sin[:, None, :]
    if mode == ROPE_NORMAL:
        x0, x1 = x[..., 0:n_dims:2].astype(np.float64), x[..., 1:n_dims:2].astype(np.float64)
        out[..., 0:n_dims:2] = x0 * c - x1 * s
        out[..., 1:n_dims:2] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].astype(np.float64), x[..., half:n_dims].astype(np.float64)
        out[..., :half] = x0 * c - x1 * s
        out[..., half:n_dims] = x0 * s + x1 * c
    return out


@pytest.mark.parametrize("mode", [ROPE_NORMAL, ROPE_NEOX], ids=["normal", "neox"])
@given(half_head=st.integers(1, 16), data=st.data(), n_tokens=st.integers(1, 6), n_head=st.integers(1, 3),
       seed=seeds, freq_base=st.sampled_from([100.0, 10000.0, 1e6]), freq_scale=st.sampled_from([1.0, 0.25]),
       attn_factor=st.sampled_from([1.0, 0.7]), with_factors=st.booleans(), yarn=st.booleans(),
       max_pos=st.sampled_from([8, 64, 2048]))
def test_rope_formula(backend, mode, half_head, data, n_tokens, n_head, seed, freq_base, freq_scale, attn_factor,
                      with_factors, yarn, max_pos):
    head_dim = 2 * half_head
    n_dims = 2 * data.draw(st.integers(1, half_head), label="rotated pairs")
    rng = rng_for(seed)
    x = rng.standard_normal((n_tokens, n_head, head_dim)).astype(np.float32)
    pos = rng.integers(0, max_pos, n_tokens).astype(np.int32)
    ff = rng.uniform(0.5, 4.0, n_dims // 2).astype(np.float32) if with_factors else None
    kw = dict(n_dims=n_dims, freq_base=freq_base, freq_scale=freq_scale, attn_factor=attn_factor,
              ext_factor=1.0 if yarn else 0.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=64)
    got = ggml_rope(backend, x, pos, mode, ff, **kw)
    ref = numpy_rope(x, pos, mode=mode, freq_factors=ff, **kw)
    name = "rope formula " + ("normal" if mode == ROPE_NORMAL else "neox")
    check(name, max_rel(got, ref), rope_bound(int(pos.max()) + 1))
    if n_dims < head_dim:  # dimensions past n_dims pass through unchanged
        assert np.array_equal(got[..., n_dims:], x[..., n_dims:])


# -- against transformers --------------------------------------------------------------------------

def _neox_modules():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    return GPTNeoXConfig, GPTNeoXRotaryEmbedding, apply_rotary_pos_emb


def hf_rope(x: np.ndarray, pos: np.ndarray, rope_parameters: dict, head_dim: int, max_pos: int):
    """transformers' rotary embedding (GPT-NeoX: rotate_half layout, partial rotation) applied to
    x (n_tokens, n_head, head_dim): returns (float32 result as transformers computes it, float64
    result from the same inv_freq / attention_scaling, the module)."""
    Config, Rotary, apply = _neox_modules()
    n_head = x.shape[1]
    config = Config(hidden_size=head_dim * n_head, num_attention_heads=n_head, max_position_embeddings=max_pos,
                    rope_parameters=dict(rope_parameters))
    rotary = Rotary(config)
    q32 = torch.from_numpy(x).permute(1, 0, 2)[None]  # (1, n_head, n_tokens, head_dim)
    pids = torch.from_numpy(pos.astype(np.int64))[None]
    with torch.no_grad():
        cos, sin = rotary(q32, pids)  # also applies the dynamic / longrope updates for this length
        out32, _ = apply(q32, q32, cos, sin)
        inv = rotary.inv_freq.double()
        freqs = pids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos64, sin64 = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
        q64 = q32.double()
        out64, _ = apply(q64, q64, cos64, sin64)
    return out32[0].permute(1, 0, 2).numpy(), out64[0].permute(1, 0, 2).numpy(), rotary


ROPE_TYPES = ["default", "linear", "llama3", "yarn", "yarn-native", "longrope", "dynamic"]


@st.composite
def rope_case(draw, rope_type: str):
    head_dim = draw(st.sampled_from([4, 8, 10, 16, 32]))
    prf = draw(st.sampled_from([1.0, 1.0, 0.5, 0.25]))
    dim = int(head_dim * prf)
    assume(dim > 2 if rope_type == "dynamic" else dim >= 2)  # transformers' dynamic divides by dim - 2
    theta = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    max_pos = draw(st.sampled_from([16, 64, 256]))
    # always explicit: GPTNeoXConfig otherwise defaults to rotating a quarter of the head
    params: dict = {"rope_type": rope_type.replace("-native", ""), "rope_theta": theta, "partial_rotary_factor": prf}
    if rope_type in ("linear", "dynamic"):
        params["factor"] = draw(st.sampled_from([2.0, 4.0, 8.0]))
    if rope_type == "llama3":
        params.update(factor=draw(st.sampled_from([8.0, 32.0])), low_freq_factor=1.0,
                      high_freq_factor=draw(st.sampled_from([2.0, 4.0])),
                      original_max_position_embeddings=draw(st.sampled_from([8, 32, 128])))
    if rope_type.startswith("yarn"):
        assume(dim % 2 == 0)
        params.update(factor=draw(st.sampled_from([2.0, 4.0, 16.0])),
                      original_max_position_embeddings=draw(st.sampled_from([8, 32, 128])))
        if draw(st.booleans()):
            params.update(beta_fast=draw(st.sampled_from([8.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])))
        if draw(st.booleans()):
            params.update(attention_factor=draw(st.sampled_from([0.8, 1.3])))
        elif draw(st.booleans()):
            params.update(mscale=0.707, mscale_all_dim=1.0)
    if rope_type == "longrope":
        assume(dim % 2 == 0)
        orig = draw(st.sampled_from([8, 16]))
        n = dim // 2
        params.update(original_max_position_embeddings=orig,
                      short_factor=draw(st.lists(st.floats(1.0, 4.0), min_size=n, max_size=n)),
                      long_factor=draw(st.lists(st.floats(1.0, 64.0), min_size=n, max_size=n)))
        if draw(st.booleans()):
            params["factor"] = draw(st.sampled_from([2.0, 8.0]))
        max_pos = max(max_pos, 4 * orig)
    long = draw(st.booleans())  # sequences beyond the trained length (matters for dynamic, longrope)
    return head_dim, params, max_pos, long


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@given(data=st.data(), n_tokens=st.integers(1, 6), n_head=st.integers(1, 2), seed=seeds)
def test_rope_matches_transformers(backend, rope_type, data, n_tokens, n_head, seed):
    head_dim, params, max_pos, long = data.draw(rope_case(rope_type), label="case")
    rng = rng_for(seed)
    limit = 2 * max_pos if long else max_pos
    if rope_type == "longrope":
        limit = 2 * params["original_max_position_embeddings"] if long else params["original_max_position_embeddings"]
    pos = np.sort(rng.integers(0, limit, n_tokens)).astype(np.int32)
    seq_len = int(pos.max()) + 1
    x = rng.standard_normal((n_tokens, n_head, head_dim)).astype(np.float32)

    args = ggml_rope_args(params, head_dim, max_position_embeddings=max_pos, seq_len=seq_len,
                          native_yarn=rope_type == "yarn-native")
    got = ggml_rope(backend, x, pos, ROPE_NEOX, args.freq_factors, **args.rope_kwargs())
    hf32, hf64, rotary = hf_rope(x, pos, params, head_dim, max_pos)

    assert args.n_dims == 2 * rotary.inv_freq.numel()
    assert math.isclose(args.attn_factor * (1 + 0.1 * math.log(1 / args.freq_scale) if args.ext_factor else 1),
                        rotary.attention_scaling, rel_tol=1e-6)
    bound = rope_bound(seq_len)
    check(f"rope {rope_type} vs transformers fp64", max_rel(got, hf64), bound)
    check(f"rope {rope_type} vs transformers fp32", max_rel(got, hf32), 2 * bound)
    if rope_type == "longrope":
        assert args.freq_factors_for(seq_len) is args.freq_factors


@given(half=st.integers(1, 16), data=st.data(), n_tokens=st.integers(1, 6), seed=seeds,
       theta=st.sampled_from([100.0, 10000.0]), max_pos=st.sampled_from([16, 512]))
def test_rope_normal_layout_matches_cohere(backend, half, data, n_tokens, seed, theta, max_pos):
    """GPT-J / Cohere style (adjacent pairs, repeat_interleave) = ggml's normal mode, partial too."""
    from transformers import CohereConfig
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding, apply_rotary_pos_emb

    n_dims = 2 * half
    head_dim = n_dims + 2 * data.draw(st.integers(0, 4), label="unrotated pairs")
    rng = rng_for(seed)
    x = rng.standard_normal((n_tokens, 2, head_dim)).astype(np.float32)
    pos = rng.integers(0, max_pos, n_tokens).astype(np.int32)
    args = ggml_rope_args({"rope_type": "default", "rope_theta": theta}, head_dim,
                          partial_rotary_factor=n_dims / head_dim)
    assert args.n_dims == n_dims and args.freq_factors is None
    got = ggml_rope(backend, x, pos, ROPE_NORMAL, None, **args.rope_kwargs())

    config = CohereConfig(hidden_size=n_dims, num_attention_heads=1, rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = CohereRotaryEmbedding(config)
    q = torch.from_numpy(x).permute(1, 0, 2)[None].double()
    pids = torch.from_numpy(pos.astype(np.int64))[None]
    freqs = pids[..., None].double() * rotary.inv_freq.double()
    emb = torch.repeat_interleave(freqs, 2, dim=-1)
    rot, _ = apply_rotary_pos_emb(q[..., :n_dims], q[..., :n_dims], emb.cos(), emb.sin())
    ref = torch.cat([rot, q[..., n_dims:]], dim=-1)[0].permute(1, 0, 2).numpy()
    check("rope normal layout vs transformers (cohere) fp64", max_rel(got, ref), rope_bound(int(pos.max()) + 1))


def test_rope_proportional_matches_transformers(backend):
    """proportional rope (rotates the first pairs of a full-width rotate_half layout): the unrotated
    pairs get infinite frequency factors, which ggml turns into angle 0."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from porter.rope import _RopeConfig

    head_dim, theta = 16, 10000.0
    params = {"rope_type": "proportional", "rope_theta": theta, "partial_rotary_factor": 0.5, "factor": 2.0}
    args = ggml_rope_args(params, head_dim, max_position_embeddings=64)
    assert args.n_dims == head_dim and np.isinf(args.freq_factors[4:]).all()
    inv, scaling = ROPE_INIT_FUNCTIONS["proportional"](_RopeConfig(dict(params), head_dim, 64), None)
    rng = rng_for(3)
    x = rng.standard_normal((5, 2, head_dim)).astype(np.float32)
    pos = np.array([0, 1, 7, 30, 63], np.int32)
    got = ggml_rope(backend, x, pos, ROPE_NEOX, args.freq_factors, **args.rope_kwargs())
    freqs = torch.from_numpy(pos.astype(np.float64))[None, :, None] * inv.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    q = torch.from_numpy(x).permute(1, 0, 2)[None].double()
    ref, _ = apply_rotary_pos_emb(q, q, emb.cos() * scaling, emb.sin() * scaling)
    check("rope proportional vs transformers fp64", max_rel(got, ref[0].permute(1, 0, 2).numpy()), rope_bound(64))


# -- ggml_rope_args contract -----------------------------------------------------------------------

def test_rope_args_native_where_exact():
    a = ggml_rope_args({"rope_type": "default", "rope_theta": 500000.0}, 64)
    assert (a.n_dims, a.freq_base, a.freq_scale, a.ext_factor, a.attn_factor, a.freq_factors) == (64, 5e5, 1.0, 0.0, 1.0, None)
    b = ggml_rope_args({"rope_type": "linear", "factor": 4.0}, 64, partial_rotary_factor=0.5)
    assert (b.n_dims, b.freq_base, b.freq_scale, b.freq_factors) == (32, 10000.0, 0.25, None)
    # the dict's partial_rotary_factor wins over the argument, as in transformers
    c = ggml_rope_args({"rope_type": "default", "partial_rotary_factor": 0.25}, 64, partial_rotary_factor=0.5)
    assert c.n_dims == 16
    d = ggml_rope_args({"rope_type": "dynamic", "factor": 2.0}, 64, max_position_embeddings=128)
    assert d.freq_factors is None and "dynamic" in d.note
    e = ggml_rope_args({"rope_type": "dynamic", "factor": 2.0}, 64, max_position_embeddings=128, seq_len=300)
    assert e.freq_factors is not None and np.all(e.freq_factors[1:] > 1.0)  # the base grew


def test_rope_args_longrope_choice():
    p = {"rope_type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [3.0, 5.0],
         "original_max_position_embeddings": 16}
    a = ggml_rope_args(p, 4, max_position_embeddings=64)
    assert a.freq_factors.tolist() == [1.0, 2.0] and a.long_context_threshold == 16
    assert a.freq_factors_for(16).tolist() == [1.0, 2.0]
    assert a.freq_factors_for(17).tolist() == [3.0, 5.0]
    assert ggml_rope_args(p, 4, max_position_embeddings=64, seq_len=17).freq_factors.tolist() == [3.0, 5.0]
    # factor = 64 / 16 = 4 -> attention factor sqrt(1 + ln 4 / ln 16) as transformers computes it
    assert math.isclose(a.attn_factor, math.sqrt(1 + math.log(4) / math.log(16)), rel_tol=1e-12)


@pytest.mark.parametrize("params, kwargs, message", [
    ({"rope_type": "mrope"}, {}, "not supported"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}, {}, "nested"),
    ({"rope_type": "linear"}, {}, "needs factor"),
    ({"rope_type": "llama3", "factor": 8.0}, {"max_position_embeddings": 64}, "low_freq_factor"),
    ({"rope_type": "yarn", "factor": 2.0}, {}, "original_max_position_embeddings"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0, 1.0],
      "original_max_position_embeddings": 8}, {"max_position_embeddings": 16}, "short_factor has 1 entries"),
    ({"rope_type": "dynamic", "factor": 2.0}, {}, "max_position_embeddings"),
    ({"rope_type": "default", "rope_theta": 1.0}, {}, "greater than 1"),
    ({"rope_type": "default"}, {"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "truncate": False},
     {"native_yarn": True}, "truncate"),
])
def test_rope_args_errors(params, kwargs, message):
    with pytest.raises(RopeConfigError, match=message):
        ggml_rope_args(params, 8, **kwargs)
    assert issubclass(RopeConfigError, ShapeError)


def test_rope_odd_head_cannot_fully_rotate():
    with pytest.raises(RopeConfigError, match="odd head_dim"):
        ggml_rope_args({"rope_type": "default"}, 7)
