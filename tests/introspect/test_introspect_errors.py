"""Bad input gets a ModelError that says what is wrong and what to do; remote code never runs unasked."""

from __future__ import annotations

import json
import shutil

import pytest

from porter.errors import ModelError, PorterError
from porter.introspect import introspect


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="no such folder") as exc:
        introspect(tmp_path / "nope")
    assert "model_type" in str(exc.value)


def test_file_instead_of_folder(tiny_qwen2_folder):
    with pytest.raises(ModelError, match="is a file"):
        introspect(tiny_qwen2_folder / "config.json")


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as exc:
        introspect(tmp_path)
    assert "model.safetensors" in str(exc.value)  # lists what is there


def test_malformed_config_json_names_line_and_column(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    with pytest.raises(ModelError) as exc:
        introspect(tmp_path)
    msg = str(exc.value)
    assert "not valid JSON" in msg and "line 3" in msg and "column" in msg
    assert '"hidden_size": 64,,' in msg


def test_config_json_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        introspect(tmp_path)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ModelError, match='no "model_type"'):
        introspect(tmp_path)


def test_unknown_model_type_in_folder_suggests_close_names(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "lamma"}')
    with pytest.raises(ModelError) as exc:
        introspect(tmp_path)
    msg = str(exc.value)
    assert "unknown model_type 'lamma'" in msg and "llama" in msg and "transformers 5." in msg


def test_unknown_bare_model_type():
    with pytest.raises(ModelError, match="unknown model_type 'qwen9'") as exc:
        introspect("qwen9")
    assert "qwen2" in str(exc.value) or "qwen3" in str(exc.value)


def test_no_safetensors(tiny_qwen2_folder, tmp_path):
    shutil.copy(tiny_qwen2_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        introspect(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="pytorch_model.bin") as exc:
        introspect(tmp_path)
    assert "pickle" in str(exc.value)


def test_missing_shard(make_checkpoint, tiny_config):
    folder = make_checkpoint(tiny_config("llama"), max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match="missing") as exc:
        introspect(folder)
    assert shard.name in str(exc.value)


def test_truncated_safetensors(tiny_qwen2_folder, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(tiny_qwen2_folder, folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        introspect(folder)


def test_bad_config_values_are_model_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "big"}))
    with pytest.raises(ModelError, match="LlamaConfig rejected this config") as exc:
        introspect(tmp_path)
    assert "hidden_size" in str(exc.value)
    assert isinstance(exc.value, PorterError)


# ----------------------------------------------------------------------------------------------
# Remote code

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyConfig(PretrainedConfig):
    model_type = "porter_tiny_remote"

    def __init__(self, vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)
'''

MODELING = '''
import pathlib

import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyConfig

pathlib.Path(MARKER).write_text("remote code ran")


class TinyForCausalLM(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))
'''


@pytest.fixture
def remote_folder(tmp_path, monkeypatch):
    import numpy as np
    import transformers.dynamic_module_utils as dmu
    from safetensors.numpy import save_file

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "configuration_tiny.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny.py").write_text(MODELING.replace("MARKER", repr(str(marker))))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "porter_tiny_remote",
        "architectures": ["TinyForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
        "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    }))
    save_file(
        {"embed.weight": np.zeros((16, 8), np.float32), "head.weight": np.zeros((16, 8), np.float32)},
        str(folder / "model.safetensors"),
    )
    return folder, marker


def test_remote_code_refused_without_flag(remote_folder):
    folder, marker = remote_folder
    with pytest.raises(ModelError) as exc:
        introspect(folder)
    msg = str(exc.value)
    assert "--trust-remote-code" in msg and "modeling_tiny.py" in msg
    assert not marker.exists()


def test_remote_code_runs_with_flag(remote_folder):
    folder, marker = remote_folder
    info = introspect(folder, trust_remote_code=True)
    assert marker.exists()
    assert info.model_class == "TinyForCausalLM"
    assert info.modules == [("", "TinyForCausalLM"), ("embed", "Embedding"), ("head", "Linear")]
    assert info.parameters == {"embed.weight": (16, 8), "head.weight": (16, 8)}
    assert info.hparams.hidden_size == 8 and info.ancestry == {}
    assert info.config["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny.TinyForCausalLM"


def test_auto_map_with_native_model_type_uses_transformers_code(tiny_qwen2_folder, tmp_path):
    """Checkpoints like Phi-3 ship an auto_map for a model transformers implements: run no code."""
    folder = tmp_path / "native"
    shutil.copytree(tiny_qwen2_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_qwen2.Qwen2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_qwen2.py").write_text("raise SystemExit('remote code ran')\n")
    info = introspect(folder)
    assert info.model_class == "Qwen2ForCausalLM"
    assert any("auto_map" in note and "--trust-remote-code" in note for note in info.notes)
