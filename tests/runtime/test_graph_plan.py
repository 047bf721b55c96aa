"""The unrolled graph plan's two rewrites, each checked to change no logit: early output rows
(with a prompt, the rows whose logits are read are selected as early as the graph allows, as
llama.cpp's out_ids in the last layer) and silu + mul of gated MLPs as one GLU kernel."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import porter
from porter.runtime.core import get_data, tensor_name
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


@pytest.mark.parity
def test_gated_mlp_runs_as_one_kernel_with_the_same_logits(tmp_path):
    """A tiny llama: every layer's silu(gate) * up is one GLU node, one node per layer fewer,
    logits bit for bit those of the two nodes (prompt and decode)."""
    from porter.runtime._lib import lib

    with port_tiny("llama", {}, tmp_path, seed=4, n_ctx=64) as pair:
        m = pair.porter
        n_layer = int(m.spec.hparams["n_layer"])
        ids = np.random.default_rng(5).integers(0, m.n_vocab, 9).tolist()
        got = {}
        for fuse in (True, False):
            m.fuse = fuse
            got[fuse] = (stepped_logits(m, ids, 6), m._graph(1, min(m.n_ctx, KV_BUCKET), 1, True))
        assert m._plan.glus == n_layer
        fused, plain = got[True][1], got[False][1]
        assert lib.ggml_graph_n_nodes(plain.graph) - lib.ggml_graph_n_nodes(fused.graph) == n_layer
        names = {tensor_name(lib.ggml_graph_node(fused.graph, i)) for i in range(lib.ggml_graph_n_nodes(fused.graph))}
        assert "ffn_gated-0" in names and "ffn_act-0" not in names
        np.testing.assert_array_equal(got[True][0], got[False][0])
