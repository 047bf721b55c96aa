"""The graph-spec schema: versioning and validation errors (no torch model needed)."""

from __future__ import annotations

import json

import pytest

from porter.errors import SpecError
from porter.spec import SPEC_VERSION, loads


def minimal(**over):
    spec = {
        "format": "porter-graph-spec", "version": SPEC_VERSION, "architecture": "toy",
        "hparams": {"n_layer": 2, "eps": 1e-5, "flags": [True, False]},
        "inputs": [{"name": "tokens", "kind": "tokens"}, {"name": "out_ids", "kind": "out_ids"}],
        "weights": [{"name": "emb.weight", "shape": [10, 4]},
                    {"name": "blk.{L}.norm.weight", "shape": [4], "layered": True}],
        "graph": [
            {"name": "inp", "op": "get_rows", "inputs": ["emb.weight", "tokens"]},
            {"repeat": "n_layer", "init": "inp", "result": "out-{L}", "body": [
                {"name": "n-{L}", "op": "rms_norm", "inputs": ["$carry"], "attrs": {"eps": "$eps"}},
                {"name": "out-{L}", "op": "mul", "inputs": ["n-{L}", "blk.{L}.norm.weight"], "when": "$flags[L]"},
            ]},
            {"name": "logits", "op": "mul_mat", "inputs": ["emb.weight", "$carry"]},
        ],
        "outputs": ["logits"],
    }
    spec.update(over)
    return spec


def test_valid_spec_round_trips():
    spec = loads(json.dumps(minimal()))
    assert spec.weight_names() == ["emb.weight", "blk.0.norm.weight", "blk.1.norm.weight"]
    again = loads(spec.to_json())
    assert again == spec


def test_unknown_version_is_a_clear_error():
    with pytest.raises(SpecError, match="version 99 is not supported"):
        loads(json.dumps(minimal(version=99)))


def test_a_boolean_version_is_not_version_1():
    with pytest.raises(SpecError, match="version True is not supported"):
        loads(json.dumps(minimal(version=True)))


def test_schema_errors_are_one_line_saying_where_and_what_to_do():
    spec = minimal()
    del spec["hparams"]
    spec["weights"][0]["shape"] = "ten"
    with pytest.raises(SpecError) as info:
        loads(json.dumps(spec))
    message = str(info.value)
    assert "\n" not in message
    assert "hparams: Field required" in message and "weights.0.shape:" in message, message
    assert message.endswith("convert the model again (or regenerate a plugin's spec with `porter generate`)")


def test_not_a_spec():
    with pytest.raises(SpecError, match="not a porter graph spec"):
        loads("{}")
    with pytest.raises(SpecError, match="not valid JSON"):
        loads("{")


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["graph"][0].update(op="frobnicate"), "not in porter's op vocabulary"),
    (lambda s: s["graph"][0].update(inputs=["nope", "tokens"]), "'nope' is not an earlier node"),
    (lambda s: s["graph"][1]["body"][0]["attrs"].update(eps="$missing"), "names no hparam"),
    (lambda s: s["graph"][1]["body"][0].update(attrs={}), "needs attributes"),
    (lambda s: s["graph"][1]["body"][0]["attrs"].update(color=1), "unknown attributes"),
    (lambda s: s["graph"][1].update(result="zzz-{L}"), "repeat result"),
    (lambda s: s.update(outputs=["ghost"]), "output 'ghost' is not a node"),
    (lambda s: s["inputs"].append({"name": "x", "kind": "telepathy"}), "unknown kind"),
    (lambda s: s["graph"][0].update(attrs={"k": "$flags[L]"}), "unknown attributes"),
    (lambda s: s["graph"][1]["body"][1].update(name="out"), "must contain {L}"),
])
def test_invalid_specs_name_the_problem(mutate, message):
    spec = minimal()
    mutate(spec)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        loads(json.dumps(spec))


def test_extra_fields_are_rejected():
    spec = minimal()
    spec["graph"][0]["colour"] = "red"
    with pytest.raises(SpecError, match="colour"):
        loads(json.dumps(spec))
