"""``porter port``: the route it takes, the files it writes, and what an op gap looks like.

The certificate ``porter port`` prints is computed against transformers at run time (the same
harness as ``porter parity``); these tests read its JSON and the exit status."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from porter.cli import main

pytestmark = pytest.mark.parity
sys.path.insert(0, str(Path(__file__).parent))


def _port(*args: str):
    return CliRunner().invoke(main, ["port", *args], catch_exceptions=False)


def test_a_type_no_plugin_claims_takes_the_traced_path(tmp_path):
    gguf, cert, spec = tmp_path / "helium.gguf", tmp_path / "cert.json", tmp_path / "spec.json"
    r = _port("helium", "-o", str(gguf), "--json", str(cert), "--spec", str(spec), "--greedy", "8")
    assert r.exit_code == 0, r.output
    assert "route: traced" in r.output and "no porter plugin claims model_type 'helium'" in r.output
    data = json.loads(cert.read_text())
    assert data["route"] == "traced"
    assert data["reports"] and all(rep["passed"] for rep in data["reports"])
    assert all(rep["logits"]["nmse"] <= 1e-6 for rep in data["reports"])
    written = json.loads(spec.read_text())
    assert "traced" in written["produced_by"] and written["architecture"] == "helium"
    import porter

    m = porter.load(gguf)
    assert m.spec.layer_loop is not None and m.spec.to_json() == spec.read_text()


def test_traced_forces_the_traced_path_for_a_claimed_type(tmp_path):
    r = _port("qwen2", "--traced", "-o", str(tmp_path / "q.gguf"), "--greedy", "4")
    assert r.exit_code == 0, r.output
    assert "route: traced" in r.output and "--traced (a plugin claims this model)" in r.output


def test_a_claimed_type_takes_the_declared_path(tmp_path):
    r = _port("qwen2", "-o", str(tmp_path / "q.gguf"), "--no-parity")
    assert r.exit_code == 0, r.output
    assert "route: declared" in r.output and (tmp_path / "q.gguf").is_file()


def test_an_op_without_lowering_exits_2_with_a_report_naming_op_and_module(tmp_path):
    import unported_model

    report = tmp_path / "gap.json"
    out = tmp_path / "never.gguf"
    r = _port(unported_model.MODEL_TYPE, "-o", str(out), "--report", str(report))
    assert r.exit_code == 2, r.output
    assert "aten.special_i0.default" in r.output and "model.layers.0.mlp.act_fn" in r.output
    data = json.loads(report.read_text())
    assert data["model_type"] == unported_model.MODEL_TYPE
    gap = data["gaps"][0]
    assert (gap["op"], gap["module"], gap["module_class"]) == ("aten.special_i0.default", "model.layers.0.mlp.act_fn",
                                                               "Bessel")
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))  # nothing half-written


def test_a_hybrid_moe_type_passes_node_by_node(tmp_path):
    """qwen3_next: delta-rule layers beside attention, routed experts beside a shared one. Modules
    that see the tokens flattened (its gated norm over tokens x heads, the experts' rows) are
    compared node by node too, the experts' rows in token order."""
    cert = tmp_path / "cert.json"
    r = _port("qwen3_next", "--json", str(cert), "--greedy", "8")
    assert r.exit_code == 0, r.output
    nodes = [n for rep in json.loads(cert.read_text())["reports"] for n in rep["nodes"]]
    compared = {n["hf_module"] for n in nodes}
    assert "model.layers.0.linear_attn.norm" in compared and "model.layers.0.mlp.experts.act_fn" in compared
    assert all(n["ok"] for n in nodes), [n["node"] for n in nodes if not n["ok"]]
