"""Gemma 3 (text): Gemma 2 with per-head qk-norm, no attention soft-capping, and rope
parameters per layer type (local layers: sliding window and their own base; global layers:
full attention, often linear-scaled rope), in a sliding pattern (5 local, 1 global by default)."""

from __future__ import annotations

from plugins.gemma2 import Gemma2
from porter.plugins import hookimpl
from porter.rope import ggml_rope_args

ROPE_ATTRS = ("n_dims", "freq_base", "freq_scale", "ext_factor", "attn_factor", "beta_fast", "beta_slow",
              "n_ctx_orig")


class Gemma3Text(Gemma2):
    model_type = "gemma3_text"
    family = "gemma"
    gguf_arch = "gemma3"
    features = Gemma2.features + ("qk_norm", "rope_per_layer")
    knobs = {"qk_norm": True, "rope_per_layer": True}
    tensors = {**Gemma2.tensors, "output.weight": "lm_head.weight"}  # llama.cpp's gemma3 may be untied
    tiny = {"sliding_window_pattern": 2, "final_logit_softcapping": None, "attn_logit_softcapping": None}
    space = {
        "sliding_window_pattern": [2, 3, 6],
        "attn_logit_softcapping": [None],  # read by the config, never applied by Gemma 3's attention
        "final_logit_softcapping": [None, 3.0],
        "rope_parameters": [
            {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            {"full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            {"full_attention": {"rope_type": "default", "rope_theta": 100.0},
             "sliding_attention": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        ],
    }

    def softcaps(self):
        return {k: v for k, v in super().softcaps().items() if k == "final_softcap"}

    def layer_rope(self) -> list:
        hp = self.hp
        by_type = hp.rope_by_layer_type or {}
        types = hp.layer_types or ["full_attention"] * hp.num_layers
        args = {t: ggml_rope_args(by_type.get(t) or hp.rope, hp.head_dim, hp.partial_rotary_factor,
                                  hp.max_position_embeddings) for t in set(types)}
        for t, a in args.items():
            if a.freq_factors is not None:
                from porter.errors import ModelError

                raise ModelError(f"{self.model_type}: rope of {t} layers needs frequency factors, "
                                 "which per-layer rope does not carry")
        return [args[t] for t in types]

    def gguf_kv(self):
        # llama.cpp's gemma3: rope.freq_base (and scaling) for global layers, rope.freq_base_swa
        # for local ones (their scale is always 1 there), which layers slide as a bool per layer
        kv, a = super().gguf_kv(), self.gguf_arch
        local = (self.hp.rope_by_layer_type or {}).get("sliding_attention")
        if local and local.get("rope_theta"):
            kv[f"{a}.rope.freq_base_swa"] = float(local["rope_theta"])
        if self.hp.sliding_window:
            kv[f"{a}.attention.sliding_window_pattern"] = self.layer_is_sliding()
        return kv

    def spec_hparams(self):
        values = super().spec_hparams()
        per_layer = self.layer_rope()
        for attr in ROPE_ATTRS:
            values[f"rope_{attr}"] = [getattr(a, attr) for a in per_layer]
        return values


@hookimpl
def porter_architectures():
    return [Gemma3Text]
