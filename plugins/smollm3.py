"""SmolLM3: Llama whose every n-th layer has no rope (``no_rope_layers[i] == 0``: a NoPE
layer), optionally with sliding-window attention on those layers.

llama.cpp's ``smollm3`` converter derives from its llama one: q/k rows permuted for normal
rope. Its graph assumes a NoPE layer every 4th layer; porter's spec carries the list itself.
"""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class SmolLM3(Llama):
    model_type = "smollm3"
    family = "llama"
    gguf_arch = "smollm3"
    features = Llama.features + ("nope_layers", "sliding_window")
    knobs = {"rope_when": "$use_rope[L]", "mask": "$attn_mask[L]"}
    tiny = {"use_sliding_window": False, "sliding_window": None}
    space = {
        "no_rope_layer_interval": [2, 3, 4],
        "use_sliding_window": [False, True],
        "sliding_window": [2, 5],
    }

    def use_rope(self) -> list[bool]:
        flags = self.hp.extra.get("no_rope_layers")
        if flags is None:
            step = int(self.hp.extra.get("no_rope_layer_interval", 4))
            flags = [(i + 1) % step != 0 for i in range(self.hp.num_layers)]
        return [bool(f) for f in flags[: self.hp.num_layers]]

    def layer_is_sliding(self) -> list[bool]:
        types = self.hp.layer_types or ["full_attention"] * self.hp.num_layers
        return [bool(self.hp.sliding_window) and t == "sliding_attention" for t in types]

    def spec_hparams(self):
        values = super().spec_hparams()
        values["use_rope"] = self.use_rope()
        values["attn_mask"] = ["kq_mask_swa" if s else "kq_mask" for s in self.layer_is_sliding()]
        if any(self.layer_is_sliding()):
            values["sliding_window"] = int(self.hp.sliding_window)
        return values


@hookimpl
def porter_architectures():
    return [SmolLM3]
