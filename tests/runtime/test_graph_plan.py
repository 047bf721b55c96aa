"""The unrolled graph plan's rewrites, each checked to change no logit: early output rows (with a
prompt, the rows whose logits are read are selected as early as the graph allows, as llama.cpp's
out_ids in the last layer), silu + mul of gated MLPs as one GLU kernel, and products of one input
whose weights are neighbours in memory as one product (porter.runtime.fusion)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import porter
from porter.runtime.core import get_data
from porter.runtime.model import KV_BUCKET
from porter.runtime.plan import GraphPlan
from porter.testing.parity import port_tiny, stepped_logits
from tinygguf import SPEC, write

# tinygguf's spec with its logits read through out_ids: every step after the token lookup is
# row-wise, so the selection moves back to the embeddings
ROWS_SPEC = copy.deepcopy(SPEC)
ROWS_SPEC["inputs"].append({"name": "out_ids", "kind": "out_ids"})
ROWS_SPEC["graph"][-1:] = [{"name": "out_rows", "op": "get_rows", "inputs": ["$carry", "out_ids"]},
                           {"name": "result_output", "op": "mul_mat", "inputs": ["output.weight", "out_rows"]}]


def reference(m, ids, scale: float = 1.0):
    """numpy: the tiny spec's logits of every position (norm weights times ``scale``)."""
    w = {name: get_data(t).astype(np.float64) for name, t in m.weights.items()}
    x = w["token_embd.weight"][ids]
    for i in range(2):
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * (scale * w[f"blk.{i}.attn_norm.weight"])
    return x @ w["output.weight"].T


def test_selection_moves_to_the_embeddings_and_logits_stay(tmp_path):
    with porter.load(write(tmp_path / "rows.gguf", spec=ROWS_SPEC), n_threads=1) as m:
        plan = GraphPlan(m.spec, m.weights)
        assert plan.rows is not None and plan.rows.root == "out_rows"
        moved = {s.name: s.select for s in plan.steps if s.select}
        assert moved == {"norm-0": (0,)}, moved  # the first row-wise step reads the token lookup
        ids = [1, 5, 2, 7, 3]
        last = m.forward(ids)
        g = m._graph(len(ids), min(m.n_ctx, KV_BUCKET), 1, True)  # the graph forward used
        assert g.outputs["result_output"].ne[1] == 1
        assert m.early_rows
        every = m.logits(ids)
        ref = reference(m, ids)
    np.testing.assert_allclose(last[0], every[-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(every, ref, rtol=1e-5, atol=1e-5)


def test_a_shape_the_plan_cannot_foresee_builds_the_graph_as_written(tmp_path):
    """A row-wise step that reads a computed [features, 1] tensor (not one row per token): the
    selection cannot move past it; the model builds its graphs as written from then on."""
    spec = copy.deepcopy(ROWS_SPEC)
    body = spec["graph"][1]["body"]
    body.insert(0, {"name": "scaled-{L}", "op": "scale", "inputs": ["blk.{L}.attn_norm.weight"], "attrs": {"s": 2.0}})
    body[-1]["inputs"] = ["norm-{L}", "scaled-{L}"]
    with porter.load(write(tmp_path / "unfit.gguf", spec=spec), n_threads=1) as m:
        ids = [4, 1, 6]
        last = m.forward(ids)
        assert not m.early_rows
        m.reset()
        every = m.forward(ids, all_logits=True)
        ref = reference(m, ids, scale=2.0)
    np.testing.assert_allclose(every, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last[0], every[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parity
def test_llama_last_layer_runs_on_the_output_row_only(tmp_path):
    """A tiny llama: the last layer's feed-forward block runs on one row, the others on all,
    and the last row's logits equal those of the full graph and of transformers."""
    from porter.parity.logits import hf_logits
    from porter.parity.metrics import nmse

    with port_tiny("llama", {}, tmp_path, seed=3, n_ctx=64) as pair:
        m = pair.porter
        n_layer = int(m.spec.hparams["n_layer"])
        ids = np.random.default_rng(2).integers(0, m.n_vocab, 11).tolist()
        m.reset()
        last = m.forward(ids)
        g = m._graph(len(ids), min(m.n_ctx, KV_BUCKET), 1, True)  # the graph forward used
        assert m._plan.rows is not None
        selects = {s.name for s in m._plan.steps if s.select}
        assert selects == {f"attn_out-{n_layer - 1}", f"ffn_inp-{n_layer - 1}"}, selects
        m.reset()
        every = m.forward(ids, all_logits=True)
        m.reset()
        assert g.outputs["result_output"].ne[1] == 1
        assert nmse(every[-1:], last) <= 1e-10
        assert nmse(hf_logits(pair.hf, ids)[-1:], last) <= 1e-6


def _ops(graph) -> dict[str, int]:
    from collections import Counter

    from porter.runtime._lib import ffi, lib

    return Counter(ffi.string(lib.ggml_op_desc(lib.ggml_graph_node(graph, i))).decode()
                   for i in range(lib.ggml_graph_n_nodes(graph)))


@pytest.mark.parity
@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_gated_mlp_and_stacked_products_give_the_same_logits(tmp_path, outtype):
    """A tiny llama (q4_0: its matrices repacked): each layer's q, k, v products are one product,
    gate and up another, and silu(gate) * up one GLU node reading it; logits bit for bit those of
    the graph as the spec writes it (prompt and decode)."""
    with port_tiny("llama", {"hidden_size": 64, "intermediate_size": 96}, tmp_path, seed=4, n_ctx=64,
                   outtype=outtype) as pair:
        m = pair.porter
        n_layer = int(m.spec.hparams["n_layer"])
        ids = np.random.default_rng(5).integers(0, m.n_vocab, 9).tolist()
        got = {}
        for fuse in (True, False):
            m.fuse = fuse
            got[fuse] = (stepped_logits(m, ids, 6), m._graph(1, min(m.n_ctx, KV_BUCKET), 1, True))
        assert m._plan.glus == n_layer
        assert sorted(g.name for g in m._plan.fused.groups if g.name.endswith("-0")) == ["Qcur-0+Kcur-0+Vcur-0",
                                                                                          "ffn_gate-0+ffn_up-0"]
        assert len(m._plan.fused.groups) == 2 * n_layer
        if outtype == "q4_0":
            assert "blk.0.attn_q.weight" in m.repacked and "blk.0.ffn_up.weight" in m.repacked
        fused, plain = _ops(got[True][1].graph), _ops(got[False][1].graph)
        assert plain["MUL_MAT"] - fused["MUL_MAT"] == 3 * n_layer  # 7 products per layer become 4
        assert fused["SWIGLU"] == plain["SILU"] == n_layer and fused["SILU"] == plain["SWIGLU"] == 0
        np.testing.assert_array_equal(got[True][0], got[False][0])


STACK_SPEC = copy.deepcopy(SPEC)
STACK_SPEC["weights"][1:2] = [{"name": "blk.{L}.wa.weight", "shape": ["$n_embd", "$n_embd"], "layered": True},
                              {"name": "blk.{L}.wb.weight", "shape": ["$n_embd", "$n_embd"], "layered": True}]
STACK_SPEC["graph"][1]["result"] = "sum-{L}"
STACK_SPEC["graph"][1]["body"] = [
    {"name": "a-{L}", "op": "mul_mat", "inputs": ["blk.{L}.wa.weight", "$carry"]},
    {"name": "b-{L}", "op": "mul_mat", "inputs": ["blk.{L}.wb.weight", "$carry"]},
    {"name": "sum-{L}", "op": "add", "inputs": ["a-{L}", "b-{L}"]}]


@pytest.mark.parametrize("between", [False, True])
def test_only_neighbours_in_memory_are_stacked(tmp_path, between):
    """Two products of one input: stacked when their weights are neighbours in the file, not when
    another tensor lies between them; the logits are numpy's either way."""
    rng = np.random.default_rng(7)
    w = {"token_embd.weight": rng.standard_normal((8, 4), dtype=np.float32)}
    for i in range(2):
        w[f"blk.{i}.wa.weight"] = rng.standard_normal((4, 4), dtype=np.float32)
        if between:
            w[f"blk.{i}.gap"] = np.zeros(8, np.float32)
        w[f"blk.{i}.wb.weight"] = rng.standard_normal((4, 4), dtype=np.float32)
    w["output.weight"] = rng.standard_normal((8, 4), dtype=np.float32)
    ids = [1, 5, 2, 7]
    with porter.load(write(tmp_path / "stack.gguf", spec=STACK_SPEC, weights=w), n_threads=1) as m:
        logits = m.logits(ids)
        assert len(m._plan.fused.groups if m._plan.fused else []) == (0 if between else 2)
    x = w["token_embd.weight"][ids].astype(np.float64)
    for i in range(2):
        x = x @ w[f"blk.{i}.wa.weight"].T + x @ w[f"blk.{i}.wb.weight"].T
    np.testing.assert_allclose(logits, x @ w["output.weight"].T, rtol=1e-4, atol=1e-4)


def test_a_reshape_no_view_can_express_unstacks_the_products(tmp_path):
    """A stacked product's view reshaped in a way no strided view can express (ne [4, 5] read as
    [5, 4]): the model computes its products on their own instead, with the same logits."""
    spec = copy.deepcopy(STACK_SPEC)
    spec["graph"][1]["body"][2:2] = [
        {"name": "t-{L}", "op": "reshape", "inputs": ["a-{L}"], "attrs": {"shape": ["$n_tokens", "$n_embd"]}},
        {"name": "u-{L}", "op": "reshape", "inputs": ["t-{L}"], "attrs": {"shape": ["$n_embd", "$n_tokens"]}}]
    spec["graph"][1]["body"][-1]["inputs"] = ["u-{L}", "b-{L}"]
    rng = np.random.default_rng(8)
    w = {"token_embd.weight": rng.standard_normal((8, 4), dtype=np.float32)}
    for i in range(2):
        w[f"blk.{i}.wa.weight"] = rng.standard_normal((4, 4), dtype=np.float32)
        w[f"blk.{i}.wb.weight"] = rng.standard_normal((4, 4), dtype=np.float32)
    w["output.weight"] = rng.standard_normal((8, 4), dtype=np.float32)
    ids = [1, 5, 2, 7, 3]
    with porter.load(write(tmp_path / "unstack.gguf", spec=spec, weights=w), n_threads=1) as m:
        logits = m.logits(ids)
        assert m._plan.fused.found == 2 and m._plan.fused.groups == []
    x = w["token_embd.weight"][ids].astype(np.float64)
    for i in range(2):
        x = x @ w[f"blk.{i}.wa.weight"].T + x @ w[f"blk.{i}.wb.weight"].T
    np.testing.assert_allclose(logits, x @ w["output.weight"].T, rtol=1e-4, atol=1e-4)


def test_a_strided_tensor_reshapes_as_a_view():
    """Ops.reshape of a strided window splits and merges dimensions without a copy, with numpy's
    values, and refuses (ShapeError) a shape that would need one."""
    from porter.errors import ShapeError
    from porter.runtime.core import Backend, GraphRunner

    a = np.arange(5 * 12, dtype=np.float32).reshape(5, 12)  # ggml ne [12, 5]
    with Backend(1) as be, GraphRunner(be) as g:
        x = g.input(a)
        cols = g.ops.view(x, [6, 5], [x.nb[1], x.nb[2], x.nb[3]], 4 * 4)  # a[:, 4:10]
        split = g.ops.reshape(cols, [3, 2, 5])
        merged = g.ops.reshape(split, [6, 5])
        out = g.compute([g.ops.cont(split), g.ops.cont(merged)])
        with pytest.raises(ShapeError, match="contiguous"):
            g.ops.reshape(cols, [30])  # rows 12 apart cannot read as one run of 30
    np.testing.assert_array_equal(out[0], a[:, 4:10].reshape(5, 2, 3))
    np.testing.assert_array_equal(out[1], a[:, 4:10])
