"""Property tests of the recurrent-state ops (short convolutions of LFM and state-space layers).

- ``ssm_conv`` (ggml's depthwise causal convolution) against torch's ``conv1d`` with
  ``groups`` = channels in float64: element-wise error <= L * 2**-23 relative to
  sum_j |w_j x_{t+j}| (L products summed in float32).
- ``state_store`` across passes: pass 1 sees R zero steps before its own, every later pass the
  last R steps of everything before it (so a sequence cut into chunks is convolved as a whole),
  and clearing the states starts over; without a cache it only prepends zeros. Bit-exact: it
  only moves values.

Shapes are drawn by hypothesis, values by a numpy generator seeded by hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ophelpers import check, exact, rng_for, run
from porter.errors import ShapeError, SpecError
from porter.runtime.core import GraphRunner

seeds = st.integers(0, 2**32 - 1)


def _conv_ref(sx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch conv1d of sx [C, R + n] by w [C, L] (no padding), and the sum of |terms|, float64."""
    x = torch.from_numpy(sx.astype(np.float64))[None]
    k = torch.from_numpy(w.astype(np.float64))[:, None]
    out = torch.nn.functional.conv1d(x, k, groups=sx.shape[0])[0]
    mag = torch.nn.functional.conv1d(x.abs(), k.abs(), groups=sx.shape[0])[0]
    return out.numpy(), mag.numpy()


@given(c=st.integers(1, 8), n=st.integers(1, 7), taps=st.integers(2, 5), seed=seeds,
       mag=st.sampled_from([1e-3, 1.0, 1e3]))
def test_ssm_conv(backend, c, n, taps, seed, mag):
    rng = rng_for(seed)
    sx = (rng.standard_normal((c, taps - 1 + n)) * mag).astype(np.float32)  # ne [R + n, C]
    w = rng.standard_normal((c, taps)).astype(np.float32)  # ne [L, C]
    got = run(backend, lambda g: g.ops.ssm_conv(g.input(sx), g.input(w)))  # ne [C, n] -> numpy (n, C)
    ref, size = _conv_ref(sx, w)
    err = float((np.abs(got.reshape(n, c).T - ref) / (size + 1e-30)).max())
    check("ssm_conv vs fp64", err, taps * 2.0**-23)


def test_ssm_conv_refuses_too_few_steps(backend):
    with GraphRunner(backend, max_nodes=16) as g:
        with pytest.raises(ShapeError, match="ssm_conv"):
            g.ops.ssm_conv(g.input(np.zeros((4, 2), np.float32)), g.input(np.zeros((4, 3), np.float32)))


def _state_spec(c: int, rows: int):
    from porter.spec import Node, Spec, WeightDecl, check as check_spec

    return check_spec(Spec(version=2, architecture="one_state", hparams={"n_layer": 1, "state_width_conv": c * rows},
                           inputs=[], weights=[WeightDecl(name="x", shape=[1, c])],
                           graph=[Node(name="y", op="state_store", inputs=["x"],
                                       attrs={"cache": "conv", "rows": rows, "layer": 0})], outputs=["y"]))


def _pass(backend, spec, kv, x: np.ndarray) -> np.ndarray:
    from porter.runtime.graph import GraphBuilder

    with GraphRunner(backend, max_nodes=64) as g:
        b = GraphBuilder(spec, g.ops, {"x": g.input(x, name="x")}, {}, {}, kv)
        y = b.build()["y"]
        return g.compute([g.ops.cont(y), *b.side_effects])[0]


@given(c=st.integers(1, 6), rows=st.integers(1, 4), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       seed=seeds)
def test_state_store_carries_the_last_steps(backend, c, rows, chunks, seed):
    from porter.runtime.graph import KVCache

    rng = rng_for(seed)
    spec = _state_spec(c, rows)
    kv = KVCache(backend, spec, 8)
    try:
        steps = [rng.standard_normal((n, c)).astype(np.float32) for n in chunks]  # numpy (n, C) = ne [C, n]
        history = np.zeros((rows, c), np.float32)
        for x in steps:
            got = _pass(backend, spec, kv, x)
            want = np.concatenate([history[-rows:], x])
            exact("state_store (pass)", got, want)
            history = want
        kv.clear_states()
        exact("state_store (after clearing)", _pass(backend, spec, kv, steps[0]),
              np.concatenate([np.zeros((rows, c), np.float32), steps[0]]))
        exact("state_store (no cache)", _pass(backend, spec, None, steps[0]),
              np.concatenate([np.zeros((rows, c), np.float32), steps[0]]))
    finally:
        kv.close()


def test_state_store_refuses_a_state_of_another_size(backend):
    from porter.runtime.graph import KVCache

    spec = _state_spec(4, 2)
    kv = KVCache(backend, _state_spec(4, 3), 8)
    try:
        with pytest.raises(SpecError, match="keeps 12 elements"):
            _pass(backend, spec, kv, np.zeros((2, 4), np.float32))
    finally:
        kv.close()
