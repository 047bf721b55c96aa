"""Property tests of the recurrent-state ops (short convolutions of LFM and state-space layers,
the gated delta rule of Qwen3-Next and Kimi linear attention).

- ``ssm_conv`` (ggml's depthwise causal convolution) against torch's ``conv1d`` with
  ``groups`` = channels in float64: element-wise error <= L * 2**-23 relative to
  sum_j |w_j x_{t+j}| (L products summed in float32).
- ``state_store`` across passes: pass 1 sees R zero steps before its own, every later pass the
  last R steps of everything before it (so a sequence cut into chunks is convolved as a whole),
  and clearing the states starts over; without a cache it only prepends zeros. Bit-exact: it
  only moves values.
- ``gated_delta_net`` against the delta rule's recurrence in float64 (transformers'
  ``torch_recurrent_gated_delta_rule``, written out), a decay per head or per key channel:
  error <= n (4 S + 8) 2**-23 relative to the largest output, memory entry or v (each token
  rescales the memory and adds S-term dot products to it, rounding errors add up over the n
  tokens; q and k are unit vectors, so no term is larger).
- ``ssm_scan`` against Mamba's selective scan recurrence in float64, Mamba-2 form (a decay per
  head, groups of heads sharing B and C) and Mamba-1 form (head size 1, a decay per state entry):
  each output's and state entry's error relative to the same recurrence run on |terms| (a
  relative error would blow up where the sums cancel) within n steps of (2 N + 8) roundings plus
  the time step's error (ggml's softplus log(1 + e^dt) is off by 2**-24 / d relative) carried
  into d x B and, |d A| times larger, into exp(d A).
- ``delta_net`` and ``ssm_scan`` across passes: a sequence cut into chunks gives bit for bit the outputs and the
  memory of one pass (ggml walks the tokens in the same order either way); clearing starts over
  from zeros, as does a pass without a cache.

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


def _one_op_spec(op: str, inputs: dict, state: str, width: int, **attrs):
    """A one-layer spec of one node ``y = op(inputs)`` (weights of the given shapes) on the layer's
    recurrent state ``state`` of ``width`` F32 numbers."""
    from porter.spec import Node, Spec, WeightDecl, check as check_spec

    return check_spec(Spec(version=2, architecture=f"one_{op}", hparams={"n_layer": 1, f"state_width_{state}": width},
                           inputs=[], weights=[WeightDecl(name=k, shape=v) for k, v in inputs.items()],
                           graph=[Node(name="y", op=op, inputs=list(inputs),
                                       attrs={"cache": state, "layer": 0, **attrs})], outputs=["y"]))


def _pass(backend, spec, kv, arrays: dict) -> np.ndarray:
    """One pass of a one-node spec on ``arrays`` (input name -> numpy), with the cache ``kv`` (or none)."""
    from porter.runtime.graph import GraphBuilder

    with GraphRunner(backend, max_nodes=64) as g:
        b = GraphBuilder(spec, g.ops, {k: g.input(a, name=k) for k, a in arrays.items()}, {}, {}, kv)
        y = b.build()["y"]
        return g.compute([g.ops.cont(y), *b.side_effects])[0]


def _state_spec(c: int, rows: int):
    return _one_op_spec("state_store", {"x": [1, c]}, "conv", c * rows, rows=rows)


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
            got = _pass(backend, spec, kv, {"x": x})
            want = np.concatenate([history[-rows:], x])
            exact("state_store (pass)", got, want)
            history = want
        kv.clear_states()
        exact("state_store (after clearing)", _pass(backend, spec, kv, {"x": steps[0]}),
              np.concatenate([np.zeros((rows, c), np.float32), steps[0]]))
        exact("state_store (no cache)", _pass(backend, spec, None, {"x": steps[0]}),
              np.concatenate([np.zeros((rows, c), np.float32), steps[0]]))
    finally:
        kv.close()


def test_state_store_refuses_a_state_of_another_size(backend):
    from porter.runtime.graph import KVCache

    spec = _state_spec(4, 2)
    kv = KVCache(backend, _state_spec(4, 3), 8)
    try:
        with pytest.raises(SpecError, match="keeps 12 elements"):
            _pass(backend, spec, kv, {"x": np.zeros((2, 4), np.float32)})
    finally:
        kv.close()


def _delta_ref(q, k, v, g, beta, memory):
    """The gated delta rule in float64, in ggml's layouts: q, k, v numpy (n, H, S), g (n, H, 1 or S),
    beta (n, H, 1), memory (H, S, S) holding M transposed (memory[h, j, i] = M[i, j], i the key
    channel). Returns out (n, H, S) and the memory after the n tokens."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    M = np.swapaxes(np.asarray(memory, np.float64), 1, 2).copy()  # (H, S_k, S_v)
    n, H, S = v.shape
    out = np.zeros((n, H, S))
    for t in range(n):
        for h in range(H):
            M[h] *= np.exp(g[t, h])[:, None]  # one decay, or one per key channel (row i of M)
            delta = (v[t, h] - k[t, h] @ M[h]) * beta[t, h, 0]
            M[h] += np.outer(k[t, h], delta)
            out[t, h] = q[t, h] @ M[h] / np.sqrt(S)
    return out, np.swapaxes(M, 1, 2)


def _delta_inputs(rng, n, H, S, per_channel):
    def unit(shape):  # the models l2-normalise q and k before the kernel
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    q, k = unit((n, H, S)), unit((n, H, S))
    v = rng.standard_normal((n, H, S)).astype(np.float32)
    g = -rng.uniform(0.0, 2.0, (n, H, S if per_channel else 1)).astype(np.float32)  # log decays <= 0
    beta = rng.uniform(0.0, 1.0, (n, H, 1)).astype(np.float32)
    return q, k, v, g, beta


@given(S=st.integers(1, 9), H=st.integers(1, 3), n=st.integers(1, 6), per_channel=st.booleans(), seed=seeds)
def test_gated_delta_net(backend, S, H, n, per_channel, seed):
    rng = rng_for(seed)
    ins = _delta_inputs(rng, n, H, S, per_channel)
    memory = rng.standard_normal((H, S, S)).astype(np.float32)
    out, after = run(backend, lambda gr: [gr.ops.cont(t) for t in
                                          gr.ops.gated_delta_net(*(gr.input(x) for x in ins), gr.input(memory))])
    ref_out, ref_after = _delta_ref(*ins, memory)
    # the terms each step sums are as large as the memory and v (q and k are unit vectors): where
    # they cancel, the result is smaller than the rounding of its terms
    scale = max(np.abs(ref_out).max(), np.abs(ref_after).max(), np.abs(memory).max(), np.abs(ins[2]).max())
    err = max(np.abs(out.reshape(ref_out.shape) - ref_out).max(), np.abs(after.reshape(ref_after.shape) - ref_after).max())
    check("gated_delta_net vs fp64", float(err / scale), n * (4 * S + 8) * 2.0**-23)


def test_gated_delta_net_refuses_unequal_head_sizes(backend):
    with GraphRunner(backend, max_nodes=16) as g:
        q, v = g.input(np.zeros((3, 2, 4), np.float32)), g.input(np.zeros((3, 2, 8), np.float32))
        gate, beta = g.input(np.zeros((3, 2, 1), np.float32)), g.input(np.zeros((3, 2, 1), np.float32))
        with pytest.raises(ShapeError, match="gated_delta_net"):
            g.ops.gated_delta_net(q, q, v, gate, beta, g.input(np.zeros((2, 8, 8), np.float32)))


def _delta_spec(H: int, S: int, per_channel: bool):
    ins = {"q": [1, H, S], "k": [1, H, S], "v": [1, H, S], "g": [1, H, S if per_channel else 1], "beta": [1, H, 1]}
    return _one_op_spec("delta_net", ins, "delta", H * S * S)


def _delta_pass(backend, spec, kv, arrays) -> np.ndarray:
    out = _pass(backend, spec, kv, dict(zip(["q", "k", "v", "g", "beta"], arrays)))
    return out.reshape(arrays[2].shape)  # (n, H, S)


@given(S=st.integers(1, 6), H=st.integers(1, 3), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       per_channel=st.booleans(), seed=seeds)
def test_delta_net_carries_its_memory_across_passes(backend, S, H, chunks, per_channel, seed):
    from porter.runtime.graph import KVCache

    rng = rng_for(seed)
    n = sum(chunks)
    ins = _delta_inputs(rng, n, H, S, per_channel)
    spec = _delta_spec(H, S, per_channel)
    whole = _delta_pass(backend, spec, None, ins)  # no cache: from zeros
    ref, _ = _delta_ref(*ins, np.zeros((H, S, S)))
    check("delta_net (no cache) vs fp64", float(np.abs(whole - ref).max() / max(np.abs(ref).max(), np.abs(ins[2]).max())),
          n * (4 * S + 8) * 2.0**-23)
    kv = KVCache(backend, spec, 8)
    try:
        start, parts = 0, []
        for m in chunks:
            parts.append(_delta_pass(backend, spec, kv, [x[start:start + m] for x in ins]))
            start += m
        exact("delta_net (chunked passes)", np.concatenate(parts), whole)
        kv.clear_states()
        exact("delta_net (after clearing)", _delta_pass(backend, spec, kv, [x[:chunks[0]] for x in ins]),
              whole[:chunks[0]])
    finally:
        kv.close()


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _scan_ref(x, dt, A, B, C, state):
    """Mamba's selective scan in float64, in ggml's layouts: x numpy (n, H, P), dt (n, H) before
    its softplus, A (H, 1) or (H, N), B, C (n, G, N), state (H, P, N). Returns y (n, H, P), the
    state after, each output's size and the state's (the recurrence run on |terms|)."""
    x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
    S = np.asarray(state, np.float64).copy()
    M = np.abs(S)  # the same recurrence on |terms|: what the sums cancel from, step after step
    n, H, P = x.shape
    G = B.shape[1]
    y, size = np.zeros((n, H, P)), np.zeros((n, H, P))
    for t in range(n):
        d = _softplus(dt[t])
        for h in range(H):
            g = h // (H // G)
            decay, new = np.exp(d[h] * A[h])[None, :], d[h] * np.outer(x[t, h], B[t, g])
            S[h] = S[h] * decay + new
            M[h] = M[h] * decay + np.abs(new)
            y[t, h] = S[h] @ C[t, g]
            size[t, h] = M[h] @ np.abs(C[t, g])
    return y, S, size, M


def _scan_bound(n: int, N: int, ins) -> float:
    """Error bound of n steps of a scan of state size N on inputs (x, dt, A, ...): (2 N + 8) roundings
    a step, plus the error of the time step d = softplus(dt) into d x B and, |d A| times larger,
    into exp(d A). ggml computes log(1 + e^dt), whose 1 + e^dt rounds: d is off by 2**-24 / d
    relative (more than torch's log1p where d is small)."""
    dt, A = np.asarray(ins[1], np.float64), np.asarray(ins[2], np.float64)
    d = _softplus(dt)
    exponent = float((d[:, :, None] * np.abs(A)[None]).max())
    e_d = 2.0**-23 * (2 + 1 / float(d.min()))
    return n * ((2 * N + 8) * 2.0**-23 + (1 + 4 * exponent) * e_d)


def _scan_inputs(rng, n, H, P, N, G, mamba1):
    x = rng.standard_normal((n, H, P)).astype(np.float32)
    dt = rng.uniform(-4.0, 1.0, (n, H)).astype(np.float32)
    A = -rng.uniform(0.5, 4.0, (H, N if mamba1 else 1)).astype(np.float32)
    B, C = (rng.standard_normal((n, G, N)).astype(np.float32) for _ in range(2))
    return x, dt, A, B, C


_scan_shapes = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9), st.integers(1, 3), st.just(False))
    .map(lambda t: (t[0] * t[3], t[1], t[2], t[3], False)),  # Mamba-2: H = G * heads per group
    st.tuples(st.integers(1, 6), st.just(1), st.integers(1, 9), st.just(1), st.just(True)))  # Mamba-1


@given(shape=_scan_shapes, n=st.integers(1, 6), seed=seeds)
def test_ssm_scan(backend, shape, n, seed):
    H, P, N, G, mamba1 = shape
    rng = rng_for(seed)
    ins = _scan_inputs(rng, n, H, P, N, G, mamba1)
    state = rng.standard_normal((H, P, N)).astype(np.float32)
    y, after = run(backend, lambda gr: [gr.ops.cont(t) for t in
                                        gr.ops.ssm_scan(*(gr.input(a) for a in ins), gr.input(state))])
    ref_y, ref_after, size, state_size = _scan_ref(*ins, state)
    err = max((np.abs(y.reshape(ref_y.shape) - ref_y) / (size + 1e-30)).max(),
              (np.abs(after.reshape(ref_after.shape) - ref_after) / (state_size + 1e-30)).max())
    check("ssm_scan vs fp64", float(err), _scan_bound(n, N, ins))


def test_ssm_scan_refuses_groups_that_do_not_divide_the_heads(backend):
    with GraphRunner(backend, max_nodes=16) as g:
        x, dt = g.input(np.zeros((2, 3, 4), np.float32)), g.input(np.zeros((2, 3), np.float32))
        A, B = g.input(np.zeros((3, 1), np.float32)), g.input(np.zeros((2, 2, 5), np.float32))
        with pytest.raises(ShapeError, match="ssm_scan"):
            g.ops.ssm_scan(x, dt, A, B, B, g.input(np.zeros((3, 4, 5), np.float32)))


def _scan_spec(H: int, P: int, N: int, mamba1: bool):
    ins = {"x": [1, H, P], "dt": [1, H], "A": [H, N if mamba1 else 1], "B": [1, 1, N], "C": [1, 1, N]}
    return _one_op_spec("ssm_scan", ins, "ssm", H * P * N)


def _scan_pass(backend, spec, kv, arrays) -> np.ndarray:
    out = _pass(backend, spec, kv, dict(zip(["x", "dt", "A", "B", "C"], arrays)))
    return out.reshape(arrays[0].shape)  # (n, H, P)


@given(shape=_scan_shapes.filter(lambda s: s[3] == 1), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       seed=seeds)
def test_ssm_scan_carries_its_state_across_passes(backend, shape, chunks, seed):
    from porter.runtime.graph import KVCache

    H, P, N, _, mamba1 = shape
    rng = rng_for(seed)
    x, dt, A, B, C = _scan_inputs(rng, sum(chunks), H, P, N, 1, mamba1)
    spec = _scan_spec(H, P, N, mamba1)
    whole = _scan_pass(backend, spec, None, [x, dt, A, B, C])  # no cache: from zeros
    ref, _, size, _ = _scan_ref(x, dt, A, B, C, np.zeros((H, P, N)))
    check("ssm_scan (no cache) vs fp64", float((np.abs(whole - ref) / (size + 1e-30)).max()),
          _scan_bound(sum(chunks), N, [x, dt, A]))
    kv = KVCache(backend, spec, 8)
    try:
        start, parts = 0, []
        for m in chunks:
            cut = slice(start, start + m)
            parts.append(_scan_pass(backend, spec, kv, [x[cut], dt[cut], A, B[cut], C[cut]]))
            start += m
        exact("ssm_scan (chunked passes)", np.concatenate(parts), whole)
        kv.clear_states()
        first = slice(0, chunks[0])
        exact("ssm_scan (after clearing)", _scan_pass(backend, spec, kv, [x[first], dt[first], A, B[first], C[first]]),
              whole[first])
    finally:
        kv.close()
