"""Arcee (AFM): Llama whose MLP has no gate: ``down(relu2(up(x)))``, ReLU squared."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Arcee(Llama):
    model_type = "arcee"
    family = "llama"
    gguf_arch = "arcee"
    features = ("rmsnorm", "rope", "gqa", "relu2")
    knobs = {"mlp": "plain"}  # the activation (relu2) comes from the config's hidden_act
    tensors = {k: v for k, v in Llama.tensors.items() if ".ffn_gate." not in k}


@hookimpl
def porter_architectures():
    return [Arcee]
