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

    gguf_config = {"attention.sliding_window": "sliding_window"}

    def gguf_kv(self):
        kv = super().gguf_kv()
        if self.hp.sliding_window:  # llama.cpp's llama has no window; porter reads it back from here
            kv[f"{self.gguf_arch}.attention.sliding_window"] = int(self.hp.sliding_window)
        return kv

    def spec_hparams(self):
        values = super().spec_hparams()
        if self.hp.sliding_window:
            values["sliding_window"] = int(self.hp.sliding_window)
        return values


@hookimpl
def porter_architectures():
    return [Mistral]
