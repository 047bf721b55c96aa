"""Qwen3: Qwen2 without projection biases, with a per-head RMSNorm on q and k (qk-norm)."""

from __future__ import annotations

from plugins.qwen2 import Qwen2
from porter.plugins import hookimpl


class Qwen3(Qwen2):
    model_type = "qwen3"
    family = "qwen"
    gguf_arch = "qwen3"
    features = ("rmsnorm", "rope", "gqa", "swiglu", "qk_norm")
    knobs = {"qk_norm": True}
    space = {"attention_bias": [False, True]}


@hookimpl
def porter_architectures():
    return [Qwen3]
