"""Normalized, weight-free view of a transformers model.

- :func:`introspect` (checkpoint folder or bare ``model_type``) -> :class:`ModelInfo`: config,
  normalized :class:`HParams`, module tree (built on the meta device), parameter names and
  shapes (from safetensors headers), and class ancestry from transformers' modular files.
- :func:`hparams_from_config`: HParams from any transformers config (tiny test configs too).
- :func:`ancestry_of`: class -> chain of classes it derives from, read with ``ast``.

Importing this package does not import torch or transformers; the functions do, when called.
"""

from __future__ import annotations

from .ancestry import ancestry_of
from .hparams import HParams, hparams_from_config, normalize_activation
from .model import ModelInfo, introspect, introspect_config, known_model_types

__all__ = [
    "HParams",
    "ModelInfo",
    "ancestry_of",
    "hparams_from_config",
    "introspect",
    "introspect_config",
    "known_model_types",
    "normalize_activation",
]
