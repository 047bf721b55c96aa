"""The traced path's pieces that need no model: size expressions, the layer fold, mask
recognition, rotary-table fitting, the op-gap report and the lowering table."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from porter.errors import SpecError
from porter.spec import expr
from porter.traced import fold
from porter.traced.lower import Emitted, Lowered
from porter.traced.values import K, T, Gap, ggml_axes, ggml_shape, spec_size


# -- size expressions ---------------------------------------------------------------------------
@given(n=st.integers(1, 10_000), k=st.integers(1, 64), c=st.integers(-5, 5))
def test_size_expressions_evaluate_like_python(n, k, c):
    env = {"n_tokens": n, "n_kv": k}
    look = lambda name, per_layer: env[name]  # noqa: E731
    assert expr.evaluate("$n_tokens*4", look) == n * 4
    assert expr.evaluate(f"($n_kv+{c})//2", look) == (k + c) // 2
    assert expr.evaluate("$n_tokens", look) == n
    assert expr.evaluate(spec_size(3 * T + K), look) == 3 * n + k


@pytest.mark.parametrize("bad", ["$n_tokens**2", "__import__('os')", "$n_tokens; 1", "$n_tokens/2", "open($x)"])
def test_size_expressions_are_data_not_code(bad):
    with pytest.raises(SpecError, match="not a size expression"):
        expr.references(bad)


def test_ggml_axes_drop_size_one_dims_beyond_four():
    assert ggml_axes((1, 4, 2, 8, 16)) == [None, 3, 2, 1, 0]
    assert ggml_shape((1, 4, 2, 8, 16)) == [16, 8, 2, 4]
    assert ggml_shape((1, T, 64)) == [64, T, 1]
    with pytest.raises(Gap):
        ggml_axes((2, 2, 2, 2, 2))


# -- the layer fold -----------------------------------------------------------------------------
def _layer(i: int, mask: str, with_moe: bool = False) -> list[Emitted]:
    c = "model.layers"
    prev = "embed" if i == 0 else f"layer.add#1-{i - 1}"
    nodes = [
        Emitted(f"norm.rms_norm-{i}", "rms_norm", [prev], {"eps": 1e-6}, i, f"{c}.{i}.norm", None, (1, T, 8)),
        Emitted(f"attn.mul_mat-{i}", "mul_mat", [f"{c}.{i}.attn.weight", f"norm.rms_norm-{i}"], {}, i, "", None, (1, T, 8)),
        Emitted(f"attn.soft_max-{i}", "soft_max", [f"attn.mul_mat-{i}", mask], {}, i, "", None, (1, T, 8)),
        Emitted(f"layer.add-{i}", "add", [prev, f"attn.soft_max-{i}"], {}, i, "", None, (1, T, 8)),
    ]
    if with_moe:
        nodes.append(Emitted(f"moe.mul_mat-{i}", "mul_mat", [f"{c}.{i}.moe.weight", f"layer.add-{i}"], {}, i, "", None,
                             (1, T, 8)))
        last = f"moe.mul_mat-{i}"
    else:
        nodes.append(Emitted(f"mlp.silu-{i}", "silu", [f"layer.add-{i}"], {}, i, "", None, (1, T, 8)))
        last = f"mlp.silu-{i}"
    nodes.append(Emitted(f"layer.add#1-{i}", "add", [f"layer.add-{i}", last], {}, i, "", None, (1, T, 8)))
    return nodes


def _lowered(layers: list[list[Emitted]]) -> Lowered:
    embed = Emitted("embed", "get_rows", ["tok.weight", "tokens"], {}, None, "embed", None, (T, 8))
    n = len(layers)
    head = Emitted("result_output", "mul_mat", ["head.weight", f"layer.add#1-{n - 1}"], {}, None, "head", None, (T, 8))
    weights = {"tok.weight": [9, 8], "head.weight": [9, 8]}
    for i, nodes in enumerate(layers):
        for node in nodes:
            for w in node.inputs:
                if w.endswith(".weight") and w.startswith("model.layers"):
                    weights[w] = [8, 8]
    inputs = {"tokens": "tokens", "kq_mask": "kq_mask", "kq_mask_swa": "kq_mask_swa"}
    return Lowered([embed] + [x for layer in layers for x in layer] + [head], inputs, weights, {}, {},
                   "result_output", True, n, {"k": [0] * n, "v": [0] * n})


def test_identical_layers_fold_into_one_loop():
    graph, hp, layered = fold.fold(_lowered([_layer(i, "kq_mask") for i in range(3)]), "model.layers")
    loop = [g for g in graph if "repeat" in g]
    assert len(loop) == 1 and hp == {}
    body = loop[0]["body"]
    assert [n["name"] for n in body][0] == "norm.rms_norm-{L}" and loop[0]["init"] == "embed"
    assert loop[0]["result"] == "layer.add#1-{L}"
    assert body[0]["inputs"] == ["$carry"]
    assert set(layered) == {"model.layers.{L}.attn.weight"}


def test_layers_differing_in_an_input_read_it_per_layer():
    masks = ["kq_mask_swa", "kq_mask", "kq_mask_swa"]
    graph, hp, _ = fold.fold(_lowered([_layer(i, m) for i, m in enumerate(masks)]), "model.layers")
    body = next(g for g in graph if "repeat" in g)["body"]
    sm = next(n for n in body if n["op"] == "soft_max")
    key = sm["inputs"][1][1:-3]
    assert hp[key] == masks


def test_dense_and_moe_layers_share_one_body_switched_per_layer():
    layers = [_layer(0, "kq_mask"), _layer(1, "kq_mask", with_moe=True), _layer(2, "kq_mask", with_moe=True)]
    graph, hp, layered = fold.fold(_lowered(layers), "model.layers")
    body = next(g for g in graph if "repeat" in g)["body"]
    by = {n["name"]: n for n in body}
    assert hp[by["mlp.silu-{L}"]["when"][1:-3]] == [True, False, False]
    assert hp[by["moe.mul_mat-{L}"]["when"][1:-3]] == [False, True, True]
    assert "when" not in by["attn.mul_mat-{L}"]
    assert layered["model.layers.{L}.moe.weight"][1] == [1, 2]  # only the layers that have it


def test_a_layer_reading_two_layers_back_is_written_out():
    layers = [_layer(i, "kq_mask") for i in range(3)]
    layers[2][0].inputs = ["layer.add-0"]  # a skip connection over a layer
    graph, hp, _ = fold.fold(_lowered(layers), "model.layers")
    assert not any("repeat" in g for g in graph)
    assert any(g["op"] == "rms_norm" and g["name"] == "norm.rms_norm-2" for g in graph)


# -- masks --------------------------------------------------------------------------------------
class _FakeLowering:
    trace = None


def _kind(visible):
    from porter.traced.aux import AuxAnalysis

    a = AuxAnalysis.__new__(AuxAnalysis)
    return a.mask_kind(None, visible)


def test_masks_are_recognised_by_value():
    n = 13
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert _kind((k <= q)[None, None]) == {"kind": "causal"}
    assert _kind(torch.ones(1, 1, n, n, dtype=torch.bool)) == {"kind": "full"}
    assert _kind((k <= q) & (k > q - 4)) == {"kind": "sliding", "window": 4}
    additive = torch.where(k <= q, 0.0, torch.finfo(torch.float32).min)
    assert _kind(additive) == {"kind": "causal"}
    assert _kind(~(k <= q)) == {"kind": "causal", "inverted": True}
    with pytest.raises(Gap, match="neither causal"):
        _kind(k >= q)
    with pytest.raises(Gap, match="position biases"):
        _kind(torch.where(k <= q, (q - k).float() * -0.5, torch.finfo(torch.float32).min))


# -- rotary tables ------------------------------------------------------------------------------
@given(base=st.sampled_from([10000.0, 500000.0, 1e6, 100.0]), dim=st.sampled_from([8, 16, 64]),
       factor=st.sampled_from([1.0, 0.8, 1.25]), neox=st.booleans())
def test_rotary_tables_give_back_their_frequencies(base, dim, factor, neox):
    from porter.traced.patterns import ROPE_NEOX, ROPE_NORMAL, _fit_frequencies, _rope_base

    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    pos = torch.arange(13, dtype=torch.float32)[:, None]
    angles = pos * inv
    full = torch.cat([angles, angles], -1) if neox else torch.repeat_interleave(angles, 2, -1)
    cos, sin = full.cos() * factor, full.sin() * factor
    f, m = _fit_frequencies(cos, sin, dim, ROPE_NEOX if neox else ROPE_NORMAL)
    assert math.isclose(m, factor, rel_tol=1e-6)
    assert torch.allclose(f, inv.double(), rtol=2e-5, atol=1e-9)
    got_base, factors = _rope_base(inv.double(), dim)
    assert math.isclose(got_base, base, rel_tol=1e-5) and factors is None
    # a scaled rope (llama3-style factors) keeps per-pair factors
    scaled = inv.double().clone()
    scaled[dim // 4:] /= 8.0
    _, factors = _rope_base(scaled, dim)
    assert factors is not None and abs(factors[-1] - 8.0) < 1e-3


def test_a_table_that_is_not_rotary_is_refused():
    from porter.traced.patterns import ROPE_NEOX, _fit_frequencies

    noise = torch.randn(13, 16, generator=torch.Generator().manual_seed(0))
    assert _fit_frequencies(noise, noise, 16, ROPE_NEOX) is None


# -- the gap report and the table ---------------------------------------------------------------
def test_gap_report_groups_by_op_and_module_and_names_the_nearest_plugin():
    from porter.traced.report import GapReport

    class N:
        def __init__(self, name, path):
            self.name = name
            self.meta = {"nn_module_stack": {"x": (path, "FancyAttention")}}

    gaps = [Gap("aten.fancy.default", "no lowering rule", N(f"fancy_{i}", f"model.layers.{i}.self_attn"))
            for i in range(3)]
    report = GapReport.from_gaps("olmo3", gaps)
    assert len(report.entries) == 1 and report.entries[0].count == 3
    assert report.entries[0].module_class == "FancyAttention"
    assert report.nearest_plugin == "olmo2"
    assert report.first_line.startswith("aten.fancy.default: no lowering rule in model.layers.0.self_attn")
    data = report.as_dict()
    assert data["gaps"][0]["nodes"] == ["fancy_0", "fancy_1", "fancy_2"]


def test_the_lowering_table_is_documented():
    from porter.traced.table import describe

    rows = describe()
    assert len(rows) > 100
    for target, doc in rows:
        # ATen ops, and porter's custom ops for the kernels kept whole (porter.traced.kernels)
        assert target.startswith(("aten.", "getitem", "porter.")) and doc, target
    assert {"porter.delta_rule.default", "porter.ssm_scan.default", "porter.selective_scan.default"} <= {
        t for t, _ in rows}


def test_docs_lowering_table_is_the_generated_one():
    from pathlib import Path

    from porter.port_cli import lowering_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "traced-lowering.md"
    assert doc.read_text() == lowering_markdown(), "docs/traced-lowering.md is stale: porter traced-ops --markdown > it"
