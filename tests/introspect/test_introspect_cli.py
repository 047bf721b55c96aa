"""porter inspect, through click's CliRunner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from porter.errors import ModelError
from porter.introspect.cli import inspect_command


def run(*args):
    return CliRunner().invoke(inspect_command, list(args))


def test_summary_of_a_model_type():
    result = run("qwen3")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("Hyperparameters", "qk_norm", "hidden_size", "4096", "Module tree", "[0..31]",
                 "Qwen3DecoderLayer ×32", "Module classes", "Ancestry", "LlamaAttention", "Parameters",
                 "Largest tensors", "model.embed_tokens.weight"):
        assert text in out, text


def test_summary_of_a_folder(tiny_qwen2_folder):
    result = run(str(tiny_qwen2_folder), "--no-modules")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "F32" in result.output
    assert "Module tree" not in result.output


def test_json(tiny_qwen2_folder):
    result = run(str(tiny_qwen2_folder), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["hparams"]["hidden_size"] == 32 and data["hparams"]["attention_bias"] is True
    assert data["parameters"]["model.embed_tokens.weight"] == [128, 32]
    assert data["modules"][0] == ["", "Qwen2ForCausalLM"]
    assert data["ancestry"]["Qwen2Attention"] == ["LlamaAttention"]
    no_modules = json.loads(run(str(tiny_qwen2_folder), "--json", "--no-modules").output)
    assert "modules" not in no_modules


def test_errors_are_model_errors(tmp_path):
    result = run(str(tmp_path / "missing"))
    assert result.exit_code != 0 and isinstance(result.exception, ModelError)
    assert "no such folder" in str(result.exception)


def test_trust_remote_code_flag_is_accepted():
    result = run("gpt2", "--trust-remote-code", "--json", "--no-modules")
    assert result.exit_code == 0 and json.loads(result.output)["hparams"]["hidden_act_raw"] == "gelu_new"


def test_attached_to_main_cli_name():
    from porter.introspect import cli

    assert cli.inspect is inspect_command and inspect_command.name == "inspect"
