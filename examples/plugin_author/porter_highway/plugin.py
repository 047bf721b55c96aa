"""porter plugin for the ``highway`` model type (defined in this package).

Read top to bottom: the transformers classes it registers, what it inherits (porter's Llama),
its knobs (porter's decoder layout, with this package's macro in the ``mlp`` slot), its extra
tensors, its configuration space, and its one graph edit.
"""

from __future__ import annotations

from pathlib import Path

from porter.arch import Llama
from porter.plugins import hookimpl


class Highway(Llama):
    model_type = "highway"
    family = "highway"
    gguf_arch = "highway"  # no llama.cpp architecture runs it; porter's runtime reads the spec
    features = ("rmsnorm", "rope", "gqa", "swiglu", "highway_mlp", "layer_scale")
    transformers_classes = {
        "config": "porter_highway.configuration_highway:HighwayConfig",  # torch-free module
        "causal_lm": "porter_highway.modeling_highway:HighwayForCausalLM",
    }
    specs_dir = "generated"  # porter generate --package porter_highway writes generated/highway.json
    knobs = {"blocks": {"mlp": "highway/blocks.j2:highway_mlp"}, "layer_scale": False}
    tensors = {
        **Llama.tensors,
        "blk.{L}.ffn_hwy_gate.weight": "model.layers.{L}.mlp.highway_gate.weight",
        "blk.{L}.ffn_hwy_gate.bias": "model.layers.{L}.mlp.highway_gate.bias",
        "blk.{L}.attn_scale.weight": "model.layers.{L}.attn_scale",
    }
    # beyond Llama's space (biases, rope types) and porter's shared shapes
    space = {"layer_scale": [True, False], "hidden_act": ["silu", "gelu"]}

    def configure(self, k):
        super().configure(k)
        k["layer_scale"] = self.has("blk.0.attn_scale.weight")  # follows the checkpoint, as biases do

    def edit_graph(self, g):
        """LayerScale: the attention output times a learned vector, before the residual add."""
        super().edit_graph(g)
        if g.knobs["layer_scale"]:
            g.insert_after("attn_out-{L}", "attn_ls-{L}", "mul", ["attn_out-{L}", "blk.{L}.attn_scale.weight"],
                           rewire=True)


@hookimpl
def porter_architectures():
    return [Highway]


@hookimpl
def porter_templates():
    return {"highway": Path(__file__).parent / "templates"}


@hookimpl
def porter_features():
    return {"highway_mlp": "highway MLP: t * mlp(x) + (1 - t) * x, t a sigmoid transform gate",
            "layer_scale": "attention output scaled by a learned vector (LayerScale)"}
