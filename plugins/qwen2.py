"""Qwen2: Llama with biases on the q, k and v projections, rotate-half rope (no q/k permutation)."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Qwen2(Llama):
    model_type = "qwen2"
    family = "qwen"
    gguf_arch = "qwen2"
    features = Llama.features + ("qkv_bias",)
    rope_mode = 2  # llama.cpp's qwen2 uses neox rope on unpermuted weights
    knobs = {"hf_qkv": True}
    tiny = {"use_sliding_window": False}
    space = {"rope_parameters": [
        {"rope_type": "default", "rope_theta": 1000000.0},
        {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}]}


@hookimpl
def porter_architectures():
    return [Qwen2]
