"""Tiny random checkpoints of any plugin's architecture (or any transformers causal LM), for parity tests."""

from __future__ import annotations

from pathlib import Path


def randomize(model, seed: int = 0) -> None:
    """Random weights scaled up from transformers' init (std 0.02) so that activations and
    logits have realistic magnitudes and differences between implementations show."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights near 1
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    model.eval()


def save_tiny(config, directory: Path, seed: int = 0, auto=None) -> Path:
    """Build the model of ``config`` with :func:`randomize`d weights and save it (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    auto = auto or AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def tiny_checkpoint(arch_cls, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random transformers model of ``arch_cls`` (safetensors, float32) into ``directory``."""
    from transformers import AutoModel, AutoModelForCausalLM

    from porter.plugins import register_transformers_classes

    register_transformers_classes(models=True)
    config = arch_cls.tiny_config(**overrides)
    return save_tiny(config, directory, seed, AutoModelForCausalLM if arch_cls.causal else AutoModel)
