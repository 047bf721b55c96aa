"""Fixtures of the introspect tests: cached introspection of default configs, tiny checkpoints.

Everything here runs on torch's meta device or reads safetensors headers: no weights are
loaded, except the few kilobytes of the tiny random checkpoints written with save_pretrained.
"""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def _introspect_cached(model_type: str):
    from porter.introspect import introspect

    return introspect(model_type)


@pytest.fixture(scope="session")
def default_info():
    """default_info("qwen3") -> ModelInfo of transformers' default qwen3 config (cached)."""
    return _introspect_cached


def _tiny_config(model_type: str, **overrides):
    """A tiny random configuration of ``model_type`` (sizes shrunk, token ids inside the vocab)."""
    from transformers import AutoConfig

    sizes = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    sizes.update(overrides)
    return AutoConfig.for_model(model_type, **sizes)


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config("qwen2", **overrides) -> a tiny transformers config."""
    return _tiny_config


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(config, **save_kwargs) -> folder written by save_pretrained (random weights)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    counter = iter(range(10**6))

    def make(config, *, auto=AutoModelForCausalLM, **save_kwargs):
        torch.manual_seed(0)
        model = auto.from_config(config)
        folder = tmp_path_factory.mktemp(f"ckpt{next(counter)}_{config.model_type}")
        model.save_pretrained(folder, **save_kwargs)
        return folder

    make.AutoModel = AutoModel
    return make


@pytest.fixture(scope="session")
def tiny_qwen2_folder(make_checkpoint):
    return make_checkpoint(_tiny_config("qwen2"))
