"""The traced path end to end: a transformers config -> export -> lowering -> graph spec -> GGUF.

:class:`TracedPort` is to the traced path what an :class:`~porter.arch.Architecture` is to the
declared one: it produces the spec and the conversion plan. The GGUF of a traced port keeps the
checkpoint's own tensor names (no llama.cpp renaming: llama.cpp cannot run an architecture it
does not know, whatever the names), stores porter's spec, tokenizer and chat template as for
declared types, and says ``general.architecture = porter``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from porter.errors import PorterError

log = logging.getLogger("porter.traced")

GGUF_ARCH = "porter"  # general.architecture of traced files: only porter runs them
WINDOW_STAND_IN = 5  # a real config's sliding window is traced as this (masks are evaluated on 13 tokens)


class OpGaps(PorterError):
    """The traced graph needs ops porter cannot lower; ``report`` says which and where."""

    def __init__(self, report):
        super().__init__(report.summary())
        self.report = report


@dataclass
class TracedPort:
    model_type: str
    config: object
    trace: object
    lowered: object
    spec: object

    # -- the GGUF --------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The model's positions, or fewer where the exported graph only holds for fewer tokens."""
        n = int(getattr(self.config, "max_position_embeddings", 0) or 2048)
        limit = self.trace.max_tokens
        return min(n, limit) if limit is not None and limit < n - 1 else n

    def conversion_plan(self, model_dir: Path, name: str = ""):
        """Every weight the spec reads, under the model's parameter name, from the checkpoint in
        ``model_dir`` (renamed or merged as transformers loads it)."""
        from porter.convert.checkpoint import Checkpoint
        from porter.convert.plan import ConversionPlan, TensorPlan
        from porter.runtime import repack
        from porter.traced.export import build_model
        from porter.traced.weights import checkpoint_sources

        spec = self.spec
        matrix_only = repack.weights_used_only_as(spec, {("mul_mat", 0), ("get_rows", 0), ("mul_mat_id", 0)})
        with Checkpoint(model_dir) as ckpt:
            stored = ckpt.names()
        sources = checkpoint_sources(build_model(self.config, meta=True), stored)
        tensors = []
        missing = []
        for w in spec.weights:
            if w.data is not None:
                continue
            layers = w.layers if w.layers is not None else range(int(spec.hparams["n_layer"]))
            names = [w.name.format(L=i) for i in layers] if w.layered else [w.name]
            for n in names:
                if n in self.lowered.tables:  # computed at trace time (a per-position table)
                    tensors.append(TensorPlan(gguf_name=n, sources=[], keep_f32=True,
                                              transform=lambda _a, t=self.lowered.tables[n]: t))
                    continue
                src = sources.get(n)
                if src is None:  # a tied parameter stored under another of its names
                    src = next((sources[a] for a in self.trace.tie_groups.get(n, []) if a in sources), None)
                if src is None:
                    missing.append(n)
                    continue
                tensors.append(TensorPlan(gguf_name=n, sources=src.keys, transform=src.transform(),
                                          keep_f32=w.name not in matrix_only))
        if missing:
            raise PorterError(f"{model_dir}: the checkpoint has no tensor for {len(missing)} parameter(s) of the "
                              f"traced model: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        cfg = self.config
        kv = {
            f"{GGUF_ARCH}.context_length": self.context_length,
            f"{GGUF_ARCH}.block_count": int(spec.hparams["n_layer"]),
            f"{GGUF_ARCH}.vocab_size": int(spec.hparams["n_vocab"]),
            "porter.traced.model_type": self.model_type,
            "porter.traced.model_class": self.trace.model_class,
        }
        return ConversionPlan(gguf_arch=GGUF_ARCH, kv=kv, tensors=tensors, spec_json=spec.to_json(),
                              name=name or getattr(cfg, "_name_or_path", "") or self.model_type,
                              ignored=("rotary_emb.", "inv_freq"))


def trace_config(config, *, meta: bool, model=None, seed: int = 0):
    """Export the causal LM of ``config``. A real configuration (``meta=True``) with a sliding
    window longer than the example is traced with a short stand-in window, so that the traced
    masks show it; the real window is put back into the spec."""
    from porter.traced.export import EXAMPLE_TOKENS, trace

    shift = None
    window = getattr(config, "sliding_window", None)
    if meta and isinstance(window, int) and window >= EXAMPLE_TOKENS - 2:
        config = config.__class__.from_dict(config.to_dict())
        config.sliding_window = WINDOW_STAND_IN
        shift = (window, WINDOW_STAND_IN)
    t = trace(config, meta=meta, model=model, seed=seed)
    t.window_shift = shift
    return t


def lower_trace(t, model_type: str):
    """Lower a trace to a checked graph spec (OpGaps when something cannot be lowered)."""
    from porter.spec import SPEC_VERSION, Spec, check
    from porter.traced import fold
    from porter.traced.lower import Lowering
    from porter.traced.report import GapReport

    lw = Lowering(t)
    lowered = lw.run()
    if lowered.gaps or lowered.output is None:
        raise OpGaps(GapReport.from_gaps(model_type, lowered.gaps, t))
    graph, extra, layered = fold.fold(lowered, lw.layers.container)
    hparams = {"n_layer": lowered.n_layer, "n_vocab": int(getattr(t.config, "vocab_size", 0) or 0)}
    hparams.update(lowered.hparams)
    for name, widths in lowered.kv_widths.items():
        hparams[f"kv_width_{name}"] = widths if len(set(widths)) > 1 else widths[0]
    for name, widths in lowered.state_widths.items():
        hparams[f"state_width_{name}"] = widths if len(set(widths)) > 1 else widths[0]
    hparams.update(extra)
    weights = []
    seen = set()
    for name, shape in lowered.weights.items():
        pattern = next((p for p in layered if _matches(p, name)), None)
        if pattern is not None:
            if pattern not in seen:
                seen.add(pattern)
                decl = {"name": pattern, "shape": shape, "layered": True}
                if layered[pattern][1] is not None:
                    decl["layers"] = layered[pattern][1]
                weights.append(decl)
        else:
            weights.append({"name": name, "shape": shape})
    for name, (shape, data) in lowered.constants.items():
        weights.append({"name": name, "shape": shape, "data": data})
    import torch

    spec = Spec(
        version=SPEC_VERSION, architecture=model_type,
        produced_by={"traced": f"torch.export of {t.model_class}", "porter": _porter_version(),
                     "transformers": version("transformers"), "torch": torch.__version__.split("+")[0],
                     "export": "static" if t.static else "dynamic sequence length",
                     "layers": "loop" if any("repeat" in g for g in graph) else "unrolled"},
        causal=lowered.causal, hparams=hparams,
        inputs=[{"name": k, "kind": v} for k, v in lowered.inputs.items()],
        weights=weights, graph=graph, outputs=["result_output"],
    )
    return check(spec), lowered


def _matches(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(re.escape(pattern).replace(r"\{L\}", r"\d+"), name) is not None


def _porter_version() -> str:
    from porter import __version__

    return __version__


def port_config(config, *, model=None, meta: bool = False, seed: int = 0) -> TracedPort:
    """Trace and lower the causal LM of a transformers config (real weights unless ``meta``)."""
    t = trace_config(config, meta=meta, model=model, seed=seed)
    spec, lowered = lower_trace(t, config.model_type)
    return TracedPort(config.model_type, t.config, t, lowered, spec)


def port_checkpoint(model_dir: Path, *, trust_remote_code: bool = False) -> TracedPort:
    """The traced port of a checkpoint's real configuration, traced without its weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise PorterError(f"{model_dir}: transformers cannot read its config ({exc})") from None
    return port_config(config, meta=True)


def port_checkpoint_weights(model_dir: Path) -> TracedPort:
    """The traced port of a checkpoint small enough to load: traced with its real weights, so
    every traced node can be evaluated (the tiny models of parity tests)."""
    import torch

    from porter.traced.export import _causal_lm_class
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = _causal_lm_class(config).from_pretrained(model_dir, dtype=torch.float32).eval()
    return port_config(model.config, model=model)


def write_traced_gguf(port: TracedPort, model_dir: Path, out: Path, outtype: str = "f32", *,
                      force: bool = False, progress: bool = True):
    """Write the GGUF of a traced port from the checkpoint's weights."""
    from porter.convert.tokenizer import tokenizer_kv
    from porter.convert.writer import write_gguf

    plan = port.conversion_plan(Path(model_dir))
    if (Path(model_dir) / "tokenizer.json").exists():
        plan.kv.update(tokenizer_kv(Path(model_dir)))
    return write_gguf(Path(model_dir), plan, Path(out), outtype, force=force, progress=progress)
