"""The base of every architecture plugin: what a plugin states, and what porter derives from it.

A plugin subclasses :class:`Architecture` (or another plugin's class, stating only what changes)
and sets class attributes:

- ``model_type``, ``family``, ``gguf_arch`` (llama.cpp's architecture name), ``features``;
- ``tensors``: the renaming table, GGUF name -> transformers parameter name, ``{L}`` for the
  layer index (entries whose source the checkpoint lacks, such as absent biases, are skipped);
- ``knobs``: the block-template choices (norm kind, activation, rope layout, biases, ...).

Methods exist for the odd cases: :meth:`transform` for real weight transforms (permuting q/k
rows, folding gemma's ``1 + w``), :meth:`spec_hparams` and :meth:`gguf_kv` for extra values.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from porter import __version__
from porter.convert.plan import ConversionPlan, TensorPlan
from porter.introspect import ModelInfo
from porter.rope import ggml_rope_args
from porter.spec import SPEC_VERSION, Spec, check

# Block-template knobs every decoder understands, with their defaults.
DEFAULT_KNOBS: dict[str, Any] = {
    "norm": "rms",  # "rms" | "layer"
    "norm_bias": False,  # LayerNorm with bias
    "norm_weight": True,  # False: every norm without weight or bias (OLMo's LayerNorm)
    "clip_qkv": False,  # clamp q, k, v to [-$clip_qkv, $clip_qkv]; set from the config's clip_qkv
    "fused_qkv": False,  # one attn_qkv weight, sliced into q, k, v
    "qkv_bias": False,
    "q_bias": False, "k_bias": False, "v_bias": False, "o_bias": False,
    "qk_norm": False,  # per-head norm of q and k (qwen3)
    "rope": True,
    "rope_freq_factors": False,  # per-pair frequency factors (rope_freqs.weight); set from the rope config
    "rope_when": None,  # per-layer "$hparam[L]" switch (smollm3's no-rope layers)
    "mask": "kq_mask",  # or "$attn_mask[L]" choosing per layer (sliding window)
    "attn_softcap": False,
    "alibi": False,  # ALiBi position bias instead of rope: softmax attention with kq_mask_alibi
    "mlp": "gated",  # "gated" (act(gate) * up) | "plain" (act(up))
    "act": "silu",  # spec op name: silu | gelu_erf | gelu_tanh | relu | relu2
    "mlp_bias": False,
    "parallel": False,  # attention and MLP read the same input
    "parallel_ffn_norm": False,  # ... each through its own norm (gpt_neox, falcon's new layout)
    "attn_pre_norm": True, "ffn_pre_norm": True,  # olmo2 turns these off
    "attn_post_norm": False, "ffn_post_norm": False,  # norms on sublayer outputs (gemma2, olmo2)
    "post_norm": False,  # bert: norm after each residual add, no pre-norms
    "qk_norm_eps": None,  # default: $norm_eps
    "qk_norm_bias": None,  # qk-norm with a bias; default: as norm_bias (stablelm's per-head norms have none)
    "attn_norm_w": "attn_norm",  # GGUF name of the attention's pre-norm (falcon's two-norm layout: attn_norm_2)
    "ffn_norm_w": "ffn_norm",  # GGUF name of the parallel block's MLP norm (falcon's two-norm layout: attn_norm)
    "rope_per_layer": False,  # rope attributes are per-layer lists (gemma3 local/global)
    "fused_gate_up": False,  # ffn_up holds [gate; up] (phi3)
    "moe_norm_topk": False,  # renormalize the chosen experts' probabilities
    "embd_scale": False, "pos_embd": False, "type_embd": False, "embd_norm": False,
    "residual_scale": False,  # granite's residual_multiplier
    "lm_head": True,  # false for encoders: the output is the final hidden state
    "final_norm": True,
    "blocks": {},  # slot -> plugin macro, "namespace/file.j2:macro" (porter/render.py SLOTS); merged along the classes
    "output_bias": False,
    "logit_scale": False,  # logits *= $logit_scale (granite 1/logits_scaling, cohere logit_scale)
    "final_softcap": False,  # gemma2 final logit soft-capping
    # transformers module paths for node-by-node parity ({L} = layer)
    "hf_embed": "model.embed_tokens",
    "hf_layers": "model.layers",
    "hf_attn_norm": "input_layernorm",
    "hf_attn": "self_attn",
    "hf_qkv": True,  # q/k/v projections comparable (false when weights are permuted)
    "hf_ffn_norm": "post_attention_layernorm",
    "hf_mlp": "mlp",
    "hf_final_norm": "model.norm",
    "hf_lm_head": "lm_head",
    "hf_attn_post_norm": "post_attention_layernorm",
    "hf_ffn_post_norm": "post_feedforward_layernorm",
    "hf_embd_norm": None,
    "hf_embed_scaled": None,  # module whose output is the embedding after embd_scale (gemma's embed_tokens)
    "hf_final_hidden": None,
}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu_erf", "gelu_tanh": "gelu_tanh", "relu": "relu"}


def permute_for_normal_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows so that ggml's normal (adjacent-pair) rope equals
    transformers' rotate-half rope; llama.cpp stores llama-family q/k weights this way."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Architecture:
    model_type: ClassVar[str]
    family: ClassVar[str]
    gguf_arch: ClassVar[str]
    template: ClassVar[str] = "decoder.j2"
    causal: ClassVar[bool] = True  # False for encoders (bidirectional attention, no KV cache)
    features: ClassVar[tuple[str, ...]] = ()
    tensors: ClassVar[dict[str, str]] = {}
    # MoE experts stored one tensor per expert in the checkpoint ({E} = expert index), stacked
    # into one 3-D GGUF tensor [n_expert, rows, cols] as llama.cpp stores them
    experts: ClassVar[dict[str, str]] = {}
    knobs: ClassVar[dict[str, Any]] = {}
    # tensors the checkpoint may hold that porter deliberately does not use
    ignored_tensors: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # transformers classes of a model type the plugin defines itself, "package.module:Class" for
    # keys config, causal_lm, model; porter registers them with transformers' Auto classes
    transformers_classes: ClassVar[dict[str, str]] = {}
    # where `porter generate --package` keeps this architecture's rendered spec: a folder relative
    # to the plugin module's own (porter's built-ins: generated/)
    specs_dir: ClassVar[str | None] = None

    def __init__(self, info: ModelInfo):
        self.info = info
        self.hp = info.hparams

    # -- what the plugin chooses ---------------------------------------------------------------
    def resolved_knobs(self) -> dict[str, Any]:
        """Template knobs: defaults, then each class's ``knobs`` from the base down, then
        :meth:`configure` for choices that depend on the checkpoint."""
        k = dict(DEFAULT_KNOBS)
        blocks: dict[str, str] = {}
        for cls in reversed(type(self).__mro__):
            k.update(cls.__dict__.get("knobs", {}))
            blocks.update(cls.__dict__.get("knobs", {}).get("blocks", {}))
        k["blocks"] = blocks
        k["act"] = ACTIVATIONS.get(self.hp.hidden_act, self.hp.hidden_act)
        k["tied"] = self.tied
        k["output_weight"] = "token_embd" if self.tied else "output"  # the linear macro adds .weight
        self.configure(k)
        return k

    def configure(self, k: dict[str, Any]) -> None:
        """Adjust knobs to the checkpoint (biases present, qk-norm, ...). Override and extend."""
        k["q_bias"] = k["k_bias"] = k["v_bias"] = self.has("blk.0.attn_q.bias") or k["q_bias"]
        k["o_bias"] = self.has("blk.0.attn_output.bias") or k["o_bias"]
        k["qk_norm"] = self.has("blk.0.attn_q_norm.weight") or k["qk_norm"]
        k["mlp_bias"] = self.has("blk.0.ffn_down.bias") or k["mlp_bias"]
        if k["rope"] and not k["rope_per_layer"]:
            k["rope_freq_factors"] = self.rope_args().freq_factors is not None
        k["clip_qkv"] = self.clip_qkv() is not None

    def clip_qkv(self) -> float | None:
        """The bound q, k and v are clamped to (knob ``clip_qkv``), or None: the config's ``clip_qkv``."""
        value = self.info.config.get("clip_qkv")
        return None if value is None else float(value)

    # rope types whose frequency factors llama.cpp stores as a rope_freqs.weight tensor; other
    # types' factors travel inline in the spec, so stock llama.cpp sees only its own yarn keys
    ROPE_FACTORS_IN_GGUF: ClassVar[tuple[str, ...]] = ("llama3", "longrope")

    @property
    def rope_factors_in_gguf(self) -> bool:
        return (self.hp.rope or {}).get("rope_type") in self.ROPE_FACTORS_IN_GGUF

    @property
    def tied(self) -> bool:
        return self.hp.tie_word_embeddings or self.source_name("output.weight") is None

    def rope_args(self):
        return ggml_rope_args(self.hp.rope or {"rope_type": "default", "rope_theta": 10000.0},
                              self.hp.head_dim, self.hp.partial_rotary_factor,
                              self.hp.max_position_embeddings)

    def spec_hparams(self) -> dict[str, Any]:
        hp = self.hp
        n_embd_q = hp.num_heads * hp.head_dim
        n_embd_kv = hp.num_kv_heads * hp.head_dim
        values: dict[str, Any] = {
            "n_layer": hp.num_layers, "n_embd": hp.hidden_size, "n_vocab": hp.vocab_size,
            "n_ff": hp.intermediate_size, "n_head": hp.num_heads, "n_head_kv": hp.num_kv_heads,
            "head_dim": hp.head_dim, "n_embd_q": n_embd_q, "n_embd_kv": n_embd_kv,
            "n_embd_q_k": n_embd_q + n_embd_kv, "norm_eps": hp.norm_eps,
            "attn_scale": 1.0 / math.sqrt(hp.head_dim),
        }
        if self.resolved_knobs_cache.get("rope"):
            r = self.rope_args()
            values.update({
                "rope_n_dims": r.n_dims, "rope_mode": self.rope_mode, "rope_freq_base": r.freq_base,
                "rope_freq_scale": r.freq_scale, "rope_ext_factor": r.ext_factor,
                "rope_attn_factor": r.attn_factor, "rope_beta_fast": r.beta_fast,
                "rope_beta_slow": r.beta_slow, "rope_n_ctx_orig": r.n_ctx_orig,
            })
        if self.experts:
            values.update(self.expert_counts())
        if self.resolved_knobs_cache.get("clip_qkv"):
            values.update(clip_qkv=self.clip_qkv(), clip_qkv_min=-self.clip_qkv())
        return values

    def expert_counts(self) -> dict[str, int]:
        return {"n_expert": int(self.hp.extra["num_experts"]), "n_expert_used": int(self.hp.extra["num_experts_per_tok"])}

    def expert_sources(self, gguf_name: str) -> list[str] | None:
        """The per-expert checkpoint parameters stacked into a GGUF experts tensor, or None."""
        import re

        m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
        src = self.experts.get("blk.{L}." + m.group(2)) if m else None
        if src is None:
            return None
        names = [src.format(L=m.group(1), E=e) for e in range(self.expert_counts()["n_expert"])]
        return names if all(n in self.info.parameters for n in names) else None

    rope_mode: ClassVar[int] = 2  # neox (transformers' rotate_half); llama.cpp's llama uses 0 on permuted q/k

    # The reverse of gguf_kv, for GGUFs without a porter spec (porter.runtime.stock): llama.cpp key
    # (after "<gguf_arch>.") -> the config field it was written from, merged along the classes. Rope
    # keys are read by porter.runtime.stock itself (they build one rope_parameters dict).
    gguf_config: ClassVar[dict[str, str]] = {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "vocab_size": "vocab_size",
        "feed_forward_length": "intermediate_size",
        "attention.key_length": "head_dim",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "attention.layer_norm_epsilon": "layer_norm_eps",
        "expert_count": "num_experts",
        "expert_used_count": "num_experts_per_tok",
    }
    # config fields the graph depends on that no llama.cpp key carries: a file without a porter
    # spec is refused rather than run with transformers' default for them
    gguf_unknown: ClassVar[tuple[str, ...]] = ()
    # config fields set when rebuilding from llama.cpp keys: what llama.cpp's reading of them implies
    gguf_implies: ClassVar[dict[str, Any]] = {}

    def gguf_kv(self) -> dict[str, Any]:
        """llama.cpp's architecture keys. Override to add architecture-specific ones."""
        hp, a = self.hp, self.gguf_arch
        kv: dict[str, Any] = {
            f"{a}.context_length": hp.max_position_embeddings or 2048,
            f"{a}.embedding_length": hp.hidden_size,
            f"{a}.block_count": hp.num_layers,
            f"{a}.attention.head_count": hp.num_heads,
            f"{a}.attention.head_count_kv": hp.num_kv_heads,
            f"{a}.vocab_size": hp.vocab_size,
        }
        if hp.intermediate_size:
            kv[f"{a}.feed_forward_length"] = hp.intermediate_size
        if hp.head_dim * hp.num_heads != hp.hidden_size:
            kv[f"{a}.attention.key_length"] = hp.head_dim
            kv[f"{a}.attention.value_length"] = hp.head_dim
        eps_key = "layer_norm_rms_epsilon" if self.resolved_knobs_cache["norm"] == "rms" else "layer_norm_epsilon"
        kv[f"{a}.attention.{eps_key}"] = float(hp.norm_eps)
        if self.resolved_knobs_cache.get("rope"):
            r = self.rope_args()
            kv[f"{a}.rope.dimension_count"] = r.n_dims
            kv[f"{a}.rope.freq_base"] = float(r.freq_base)
            rope = hp.rope or {}
            rtype = rope.get("rope_type", "default")
            if rtype == "linear":
                kv[f"{a}.rope.scaling.type"] = "linear"
                kv[f"{a}.rope.scaling.factor"] = float(rope["factor"])
            elif rtype == "yarn":
                kv[f"{a}.rope.scaling.type"] = "yarn"
                kv[f"{a}.rope.scaling.factor"] = float(rope["factor"])
                kv[f"{a}.rope.scaling.original_context_length"] = int(r.n_ctx_orig)
        if self.experts:
            n = self.expert_counts()
            kv[f"{a}.expert_count"], kv[f"{a}.expert_used_count"] = n["n_expert"], n["n_expert_used"]
        return kv

    def transform(self, gguf_name: str, arrays: list[np.ndarray]) -> np.ndarray:
        """Real transforms of source tensors into the GGUF tensor (default: identity)."""
        return arrays[0]

    @classmethod
    def checkpoint_shape(cls, gguf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint parameter's shape for a GGUF tensor of ``shape`` (the inverse of what
        ``transform`` does to shapes; default: the same). Used to read a GGUF without a spec."""
        return shape

    # -- derived -------------------------------------------------------------------------------
    @property
    def resolved_knobs_cache(self) -> dict[str, Any]:
        if not hasattr(self, "_knobs"):
            self._knobs = self.resolved_knobs()
        return self._knobs

    def layer_names(self, pattern: str) -> list[str]:
        if "{L}" in pattern:
            return [pattern.format(L=i) for i in range(self.hp.num_layers)]
        return [pattern]

    def source_name(self, gguf_name: str) -> str | None:
        """The checkpoint parameter a GGUF tensor comes from, or None if absent."""
        pattern = gguf_name
        layer = None
        import re

        m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
        if m:
            layer, pattern = m.group(1), "blk.{L}." + m.group(2)
        src = self.tensors.get(pattern)
        if src is None:
            return None
        src = src.format(L=layer) if layer is not None else src
        return src if src in self.info.parameters else None

    def has(self, gguf_name: str) -> bool:
        return self.source_name(gguf_name) is not None

    def tensor_plans(self) -> list[TensorPlan]:
        """The file's tensors, in the order they are written: the model-wide ones, then layer by
        layer, each layer's in the tensor table's order. Matrices that read the same input (attn_q,
        attn_k, attn_v; ffn_gate, ffn_up) thus lie next to each other in the file, which lets the
        runtime multiply them as one matrix in place (:mod:`porter.runtime.fusion`)."""
        keyed = []  # (layer or -1, position in the tables, plan)
        for pos, (pattern, _src) in enumerate(self.tensors.items()):
            for i, name in enumerate(self.layer_names(pattern)):
                layer = i if "{L}" in pattern else -1
                src = self.source_name(name)
                if src is None:
                    continue
                shape = self.info.parameters[src]
                keyed.append((layer, pos, TensorPlan(
                    gguf_name=name, sources=[src],
                    transform=(lambda arrays, n=name: self.transform(n, arrays)),
                    keep_f32=len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")),
                )))
        for pos, pattern in enumerate(self.experts, start=len(self.tensors)):
            for i, name in enumerate(self.layer_names(pattern)):
                layer = i if "{L}" in pattern else -1
                srcs = self.expert_sources(name)
                if srcs:
                    keyed.append((layer, pos, TensorPlan(gguf_name=name, sources=srcs,
                                                         transform=lambda arrays: np.stack(arrays))))
        plans = [plan for _layer, _pos, plan in sorted(keyed, key=lambda k: k[:2])]
        if self.resolved_knobs_cache.get("rope_freq_factors") and self.rope_factors_in_gguf:
            factors = self.rope_args().freq_factors
            plans.append(TensorPlan(gguf_name="rope_freqs.weight", sources=[],
                                    transform=lambda _a, f=factors: np.asarray(f, np.float32), keep_f32=True))
        return plans

    def weight_shapes(self) -> dict[str, list[int]]:
        shapes = {}
        for pattern in self.tensors:
            src = self.source_name(pattern.format(L=0) if "{L}" in pattern else pattern)
            if src is not None:
                shapes[pattern] = list(self.info.parameters[src])
        for pattern in self.experts:
            srcs = self.expert_sources(pattern.format(L=0))
            if srcs:
                shapes[pattern] = [len(srcs), *self.info.parameters[srcs[0]]]
        if self.resolved_knobs_cache.get("rope_freq_factors"):
            shapes["rope_freqs.weight"] = [self.rope_args().n_dims // 2]
        return shapes

    def spec(self) -> Spec:
        from porter.render import render_graph

        from porter.edit import GraphEdit
        from porter.plugins import edit_graph

        knobs = self.resolved_knobs_cache
        hparams = self.spec_hparams()
        edit = GraphEdit(render_graph(self.template, knobs, hparams), knobs, hparams)
        edit_graph(self, edit)  # the class's edit_graph, then other plugins' porter_edit_graph
        graph = {"graph": edit.graph, "outputs": edit.outputs}
        used = {src for item in graph["graph"] for n in (item.get("body") or [item]) for src in n["inputs"]}
        shapes = self.weight_shapes()
        weights = [{"name": n, "shape": s, "layered": "{L}" in n} for n, s in shapes.items()
                   if n in used and n not in edit.constants]
        weights += [c for n, c in edit.constants.items() if n in used]
        if knobs.get("rope_freq_factors") and not self.rope_factors_in_gguf:
            factors = [float(x) for x in self.rope_args().freq_factors]
            weights = [w for w in weights if w["name"] != "rope_freqs.weight"]
            weights.append({"name": "rope_freqs.weight", "shape": [len(factors)], "data": factors})
        missing = sorted(u for u in used if "." in u and u not in shapes and u not in edit.constants)
        if missing:
            from porter.errors import ModelError

            raise ModelError(f"{self.model_type}: the graph needs tensors the checkpoint lacks: {', '.join(missing)}")
        input_kinds = [i for i in ("tokens", "positions", "token_types", "kq_mask", "kq_mask_swa", "kq_mask_alibi", "out_ids") if i in used
                       or any(isinstance(v, list) and i in v for v in hparams.values())]
        produced_by = {"plugin": type(self).__module__, "class": type(self).__qualname__,
                       "template": self.template, "porter": __version__}
        if knobs.get("blocks"):
            produced_by["blocks"] = ", ".join(f"{slot}={ref}" for slot, ref in sorted(knobs["blocks"].items()))
        if edit.edited_by:
            produced_by["edited_by"] = ", ".join(edit.edited_by)
        spec = Spec(
            version=SPEC_VERSION, architecture=self.model_type,
            produced_by=produced_by,
            causal=self.causal, hparams=hparams,
            inputs=[{"name": i, "kind": i} for i in input_kinds],
            weights=weights, graph=graph["graph"], outputs=graph["outputs"],
        )
        return check(spec)

    def edit_graph(self, graph) -> None:
        """Change the rendered graph before its weights are checked (a :class:`porter.edit.GraphEdit`:
        insert_after, replace, rewire, rename, remove, constant). Default: nothing. Override and call
        ``super().edit_graph(graph)`` to keep a parent's edits."""

    def conversion_plan(self) -> ConversionPlan:
        return ConversionPlan(gguf_arch=self.gguf_arch, kv=self.gguf_kv(), tensors=self.tensor_plans(),
                              spec_json=self.spec().to_json(), name=self.info.config.get("_name_or_path", "") or self.model_type,
                              ignored=tuple(self.ignored_tensors))

    # -- tests ---------------------------------------------------------------------------------
    tiny: ClassVar[dict[str, Any]] = {}
    # config field -> list of values parity properties draw from, merged along the class
    # hierarchy (answers porter_config_space); plain data, so plugins need no hypothesis import
    space: ClassVar[dict[str, list]] = {}

    @classmethod
    def q8_0_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Config changes the q8_0 parity property needs beyond whole-block sizes (MoE: route
        to every expert, since quantization noise flips near-tie discrete expert choices)."""
        return {}

    @classmethod
    def config_space(cls) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for cls_ in reversed(cls.__mro__):
            merged.update(cls_.__dict__.get("space", {}))
        return merged

    @classmethod
    def tiny_config(cls, **overrides):
        """A tiny random-model config of this architecture (every size field shrunk)."""
        from transformers import AutoConfig

        from porter.plugins import register_transformers_classes

        register_transformers_classes(models=False)
        fields = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                  "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                  "tie_word_embeddings": False}
        for cls_ in reversed(cls.__mro__):
            fields.update(cls_.__dict__.get("tiny", {}))
        fields.update(overrides)
        return AutoConfig.for_model(cls.model_type, **fields)



def __getattr__(name: str):
    """porter's built-in architecture classes (and the shared bases of ``plugins/_common.py``) as
    bases for plugins: ``from porter.arch import Llama``, not ``from plugins.llama import Llama``
    (a top-level name any project may have). Looked up in porter's own plugin modules, without
    the plugin manager (an outside plugin imports this while the manager loads it)."""
    if name.startswith("__"):  # import machinery probing (__path__, ...)
        raise AttributeError(name)
    import importlib
    import pkgutil

    from porter.plugins import BUILTIN_DIR

    found = []
    for info in pkgutil.iter_modules([str(BUILTIN_DIR)]):
        module = importlib.import_module(f"plugins.{info.name}")
        cls = vars(module).get(name)
        if isinstance(cls, type) and issubclass(cls, Architecture) and cls.__module__ == module.__name__:
            return cls
        found += [c.__name__ for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, Architecture) and c.__module__ == module.__name__]
    raise AttributeError(f"module 'porter.arch' has no attribute {name!r} (porter's architecture classes: "
                         f"{', '.join(sorted(found))})")
