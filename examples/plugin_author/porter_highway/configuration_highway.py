"""The transformers config of the ``highway`` model type (imports transformers, not torch)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class HighwayConfig(LlamaConfig):
    """Llama's fields, plus LayerScale on the attention output (``layer_scale``, a learned vector
    per layer initialised to ``layer_scale_init``). The MLP sublayer is a highway layer."""

    model_type = "highway"

    layer_scale: bool = True
    layer_scale_init: float = 0.1
