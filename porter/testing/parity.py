"""``assert_parity``: port a (tiny) model and compare it with transformers node by node."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from porter.parity.harness import ParityReport, run_parity
from porter.parity.metrics import nmse, tolerance


class PortedPair:
    """A transformers model and its porter port, from one checkpoint."""

    def __init__(self, checkpoint: Path, gguf: Path, outtype: str, n_ctx: int = 128, *,
                 placement: dict | None = None, gate: str | None = None):
        """``placement``: porter.load's ``rpc``/``devices``/``n_gpu_layers`` (where the port's
        layers run); ``gate``: the weight type whose tolerance judges it (default ``outtype``;
        ``f16`` for a GPU, whose kernels round to half precision)."""
        import torch
        import porter
        from porter.parity.logits import reference_class

        self.checkpoint, self.gguf, self.outtype = checkpoint, gguf, outtype
        self.gate = gate or outtype
        self.porter = porter.load(gguf, n_threads=None, n_ctx=n_ctx, **(placement or {}))
        auto = reference_class(self.porter.spec.architecture, traced="traced" in self.porter.spec.produced_by)
        self.hf = auto.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def close(self):
        self.porter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def port_tiny(arch, overrides: dict | None = None, directory: Path | None = None, outtype: str = "f32",
              seed: int = 0, n_ctx: int = 128, **pair_options) -> PortedPair:
    """Build a tiny random checkpoint of ``arch`` (a model_type or an Architecture class),
    convert it with that class, and load both sides (``pair_options``: :class:`PortedPair`'s
    ``placement`` and ``gate``)."""
    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    cls = architectures()[arch] if isinstance(arch, str) else arch
    directory = Path(directory or tempfile.mkdtemp(prefix="porter-tiny-"))
    ckpt = tiny_checkpoint(cls, directory / "ckpt", seed=seed, **(overrides or {}))
    gguf = directory / f"model.{outtype}.gguf"
    convert(ckpt, gguf, outtype, progress=False, force=True, arch_cls=cls)
    return PortedPair(ckpt, gguf, outtype, n_ctx=n_ctx, **pair_options)


def format_failure(report: ParityReport, context: str = "") -> str:
    first = report.first_divergence
    lines = [f"parity failed{' for ' + context if context else ''} ({report.outtype}, gate NMSE {report.tolerance:g}, "
             f"{report.n_tokens} tokens)"]
    if first is not None:
        lines.append(f"first diverging node: {first.node} (layer {first.layer}, role {first.role}, "
                     f"transformers module {first.hf_module}): NMSE {first.nmse:.3e}, max |err| {first.max_abs:.3e}")
    bad = report.first_nonfinite
    if bad is not None:
        lines.append(f"first non-finite node: {bad.node} (layer {bad.layer}, transformers module {bad.hf_module}): "
                     "porter computes NaN or infinity where transformers' values are finite")
    lg = report.logits
    lines.append(f"logits: NMSE {lg.get('nmse', float('nan')):.3e}, top-1 {lg.get('top1', 0):.1%}")
    lines.append("nodes (graph order):")
    for n in report.nodes[:40]:
        state = "ok  " if n.ok else "NaN " if not n.finite else "OVER" if n.gated else "over"  # over: not gated
        lines.append(f"  {state} {n.node:24s} {n.nmse:.2e}  {n.hf_module}")
    return "\n".join(lines)


def assert_parity(pair: PortedPair, ids, *, context: str = "") -> ParityReport:
    """Assert node-by-node and logits parity for token ids; the message names the first
    diverging node."""
    report = run_parity(pair.hf, pair.porter, list(ids), pair.gate)
    if not report.passed:
        raise AssertionError(format_failure(report, context))
    return report


def stepped_logits(model, ids, split: int) -> np.ndarray:
    """Logits of ``ids`` through the KV cache: prefill ``ids[:split]``, then one decode step per
    remaining id (one row per position). The cache is reset before and after."""
    ids = list(ids)
    model.reset()
    rows = [model.forward(ids[:split], all_logits=True)] + [model.forward([t]) for t in ids[split:]]
    model.reset()
    return np.concatenate(rows)


def assert_cache_consistent(pair: PortedPair, ids, split: int, *, context: str = "") -> float:
    """Prefill of all ids == prefill of ids[:split] then one decode step per remaining id,
    and both equal transformers; for a causal LM also the prefill that reads only the last
    row's logits. Returns the NMSE against transformers."""
    from porter.parity.logits import hf_logits

    m = pair.porter
    ids = list(ids)
    gate = tolerance(pair.gate)["nmse"]
    m.reset()
    if m.spec.causal:
        baseline = m.forward(ids, all_logits=True)
        m.reset()
        # only the last row's logits: the graph selects that row as early as it can (early rows)
        last = m.forward(ids)
        err = nmse(baseline[-1:], last)
        assert err <= gate, f"{context}: last-row prefill (early output rows) vs every row's last: NMSE {err:.3e}"
        cached = stepped_logits(m, ids, split)
        what = (f"prefill {len(ids)} vs prefill {split} + decode", "cached decode vs transformers")
    else:
        # an encoder attends both ways, so a prefix cannot be extended token by token: check
        # instead that the pass through the cache equals the cache-free pass and transformers
        cached = m.forward(ids, use_cache=True, all_logits=True)
        m.reset()
        baseline = m.forward(ids, use_cache=False, all_logits=True)
        what = ("encoder pass through the cache vs without", "encoder (cache) vs transformers")
    self_err = nmse(baseline, cached)
    assert self_err <= gate, f"{context}: {what[0]}: NMSE {self_err:.3e}"
    ref_err = nmse(hf_logits(pair.hf, ids), cached)
    assert ref_err <= gate, f"{context}: {what[1]}: NMSE {ref_err:.3e}"
    return ref_err


def port_tiny_traced(model_type: str, overrides: dict | None = None, directory: Path | None = None,
                     outtype: str = "f32", seed: int = 0, n_ctx: int = 128, config=None) -> PortedPair:
    """Port a tiny random model of any transformers causal LM through the traced path (torch.export):
    the declared plugin's tiny config when a plugin claims ``model_type``, else the config class's
    defaults shrunk (:mod:`porter.traced.tiny`)."""
    from porter.plugins import architectures
    from porter.testing.models import save_tiny
    from porter.traced.port import port_checkpoint_weights, write_traced_gguf
    from porter.traced.tiny import tiny_config

    directory = Path(directory or tempfile.mkdtemp(prefix="porter-traced-"))
    if config is None:
        arch = architectures().get(model_type)  # an encoder plugin's tiny config is not a decoder's
        config = arch.tiny_config(**(overrides or {})) if arch is not None and arch.causal else \
            tiny_config(model_type, **(overrides or {}))
    ckpt = save_tiny(config, directory / "ckpt", seed)
    port = port_checkpoint_weights(ckpt)
    gguf = directory / f"model.{outtype}.gguf"
    write_traced_gguf(port, ckpt, gguf, outtype, force=True, progress=False)
    pair = PortedPair(ckpt, gguf, outtype, n_ctx=n_ctx)
    pair.port = port
    return pair
