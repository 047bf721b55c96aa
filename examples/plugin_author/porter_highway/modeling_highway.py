"""The transformers model of the ``highway`` model type: Llama with two changes.

- The MLP is a highway layer (Srivastava et al., 2015) around Llama's gated MLP:
  ``t * mlp(x) + (1 - t) * x`` with a transform gate ``t = sigmoid(W_t x + b_t)``.
- The attention output is scaled per channel by a learned vector before the residual add
  (LayerScale, Touvron et al., 2021), when ``config.layer_scale``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel

from porter_highway.configuration_highway import HighwayConfig


class HighwayMLP(LlamaMLP):
    def __init__(self, config):
        super().__init__(config)
        self.highway_gate = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x):
        t = torch.sigmoid(self.highway_gate(x))
        return x + t * (super().forward(x) - x)


class HighwayDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: HighwayConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = HighwayMLP(config)
        self.attn_scale = (nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))
                           if config.layer_scale else None)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
        if self.attn_scale is not None:
            attn = attn * self.attn_scale
        hidden_states = residual + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class HighwayModel(LlamaModel):
    config_class = HighwayConfig

    def __init__(self, config: HighwayConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([HighwayDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class HighwayForCausalLM(LlamaForCausalLM):
    config_class = HighwayConfig

    def __init__(self, config: HighwayConfig):
        super().__init__(config)
        self.model = HighwayModel(config)
        self.post_init()
