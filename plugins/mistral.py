"""Mistral: Llama with sliding-window attention (when the config sets a window)."""

from __future__ import annotations

from plugins.llama import Llama
from porter.plugins import hookimpl


class Mistral(Llama):
    model_type = "mistral"
    family = "llama"
    gguf_arch = "llama"  # llama.cpp converts Mistral checkpoints to its llama architecture
    features = Llama.features + ("sliding_window",)
    tiny = {"sliding_window": None}
    space = {"sliding_window": [None, 2, 5, 16]}

    def configure(self, k):
        super().configure(k)
        if self.hp.sliding_window:
            k["mask"] = "kq_mask_swa"

    def spec_hparams(self):
        values = super().spec_hparams()
        if self.hp.sliding_window:
            values["sliding_window"] = int(self.hp.sliding_window)
        return values


@hookimpl
def porter_architectures():
    return [Mistral]
