"""A causal LM no plugin claims, with an op the traced path has no lowering for (``aten.special_i0``
in its MLP): registered with transformers' Auto classes on import, for the op-gap tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "porter_test_bessel"


class BesselConfig(LlamaConfig):
    model_type = MODEL_TYPE


class Bessel(torch.nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


class BesselForCausalLM(LlamaForCausalLM):
    config_class = BesselConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.act_fn = Bessel()


AutoConfig.register(MODEL_TYPE, BesselConfig, exist_ok=True)
AutoModelForCausalLM.register(BesselConfig, BesselForCausalLM, exist_ok=True)
