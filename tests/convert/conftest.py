"""Fixtures for the conversion tests: tiny random checkpoints and the real SmolLM2 checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (lets tests write any dtype, NaNs, or streams of tensors)."""
    codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("uint16"): "BF16"}
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": codes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


@pytest.fixture(scope="session")
def porter_cache(request, tmp_path_factory) -> Path | None:
    """porter's cache for the real models: $PORTER_CACHE if set (None lets porter read it), else a
    folder in pytest's cache under the repository, so the SmolLM2 checkpoint is built only once."""
    if os.environ.get("PORTER_CACHE"):
        return None
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("porter") if cache is not None else tmp_path_factory.mktemp("porter-cache")


@pytest.fixture(scope="session")
def smollm2_dir(porter_cache) -> Path:
    from porter.examples import materialize_smollm2

    return materialize_smollm2(porter_cache, progress=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer llama (rows of 64 and 256 elements), saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms are initialized to ones: make them informative
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    return out
