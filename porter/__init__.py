"""porter: port Hugging Face transformers architectures to the ggml runtime, with parity proof."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, **kwargs):
    """Load a GGUF written by porter and return a :class:`porter.runtime.model.Model`."""
    from porter.runtime.model import Model

    return Model.load(path, **kwargs)
