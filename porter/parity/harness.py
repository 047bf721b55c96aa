"""Node-by-node parity: the same token ids through transformers and the ggml runtime.

Every spec node that names a transformers module (``hf``) is captured on both sides: the
module's output through a forward hook, the node's tensor read back from ggml. Rows come in
graph order, so the first row over tolerance is where the port starts to diverge.
"""

from __future__ import annotations

import contextlib

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from porter.parity.metrics import cosine, kl_divergence, max_abs, nmse, tolerance, top1_agreement


@dataclass
class NodeParity:
    """One graph node against its transformers module: NMSE, max |error| and cosine of the
    outputs, and whether it is within the weight type's tolerance (``ok``)."""

    node: str
    hf_module: str
    layer: int | None
    role: str
    nmse: float
    max_abs: float
    cosine: float
    ok: bool  # within the type's tolerance
    gated: bool = True  # False: reported only (see STREAM_ROLES)
    finite: bool = True  # porter's values hold no NaN or infinity
    ref_finite: bool = True  # transformers' values hold no NaN or infinity


@dataclass
class ParityReport:
    """porter against transformers on ``n_tokens`` tokens at one weight type (``outtype``): every
    node (:class:`NodeParity`, graph order), the logits' metrics (``logits``), the verdict
    (:attr:`passed`) and where it went wrong (:attr:`first_divergence`, :attr:`first_nonfinite`)."""

    outtype: str
    tolerance: float
    n_tokens: int
    nodes: list[NodeParity] = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    placement: dict | None = None  # porter's layers per device when it ran split (--rpc, --device, -ngl)

    @property
    def first_divergence(self) -> NodeParity | None:
        """The first gated node over tolerance."""
        return next((n for n in self.nodes if n.gated and not n.ok), None)

    @property
    def first_over(self) -> NodeParity | None:
        """The first node over tolerance, gated or not (where to start looking)."""
        return next((n for n in self.nodes if not n.ok), None)

    @property
    def first_nonfinite(self) -> NodeParity | None:
        """The first node where porter computes NaN or infinity while transformers does not."""
        return next((n for n in self.nodes if not n.finite and n.ref_finite), None)

    @property
    def reference_nonfinite(self) -> NodeParity | None:
        """The first node where transformers itself computes NaN or infinity (the checkpoint's doing)."""
        return next((n for n in self.nodes if not n.ref_finite), None)

    @property
    def finite(self) -> bool:
        """porter's logits hold no NaN or infinity (a failure whatever the weight type's gate)."""
        return self.logits.get("finite", True)

    @property
    def badness(self) -> float:
        """The logits NMSE, infinite when porter computes NaN or infinity: the worst prompt is shown."""
        e = self.logits.get("nmse", 0.0)
        return float("inf") if not self.finite or self.first_nonfinite or e != e else e

    @property
    def passed(self) -> bool:
        """Every gated node and the logits within tolerance, and porter's values all finite."""
        # NaN fails whatever the type's gate, even when it does not reach the logits (ggml's
        # quantization of activations for a quantized matmul turns NaN into ordinary numbers)
        return (self.first_divergence is None and self.logits.get("ok", False) and self.finite
                and self.first_nonfinite is None)

    def as_dict(self) -> dict:
        """The report as JSON-ready values (``porter parity --json``), with the first diverging
        and first non-finite node names."""
        d = asdict(self)
        first = self.first_divergence
        d["first_divergence"] = first.node if first else None
        bad = self.first_nonfinite
        d["first_nonfinite"] = bad.node if bad else None
        d["passed"] = self.passed
        return d


# The residual stream and the model's outputs. With rounded weights (any type but f32) only these
# are gated: a branch (attention or MLP output, a norm's output, q/k/v) is small next to the stream
# it is added to, so its relative error is larger than the stream's without mattering more; on
# SmolLM2 at q8_0 branch outputs reach NMSE 1e-2 while every layer output stays under 1.2e-3.
STREAM_ROLES = frozenset({"inp_embd", "inp_scaled", "l_out", "result_norm", "result_output", "logits_raw"})


def _split(node_name: str) -> tuple[str, int | None]:
    m = re.match(r"^(.*)-(\d+)$", node_name)
    return (m.group(1), int(m.group(2))) if m else (node_name, None)


def hf_targets(spec) -> list[tuple[str, str]]:
    """(node name, transformers module path) for every node that declares one, in graph order."""
    from porter.spec import Repeat

    out = []
    n_layer = int(spec.hparams.get("n_layer", 0))
    for item in spec.graph:
        if isinstance(item, Repeat):
            for layer in range(n_layer):
                out.extend((n.name.format(L=layer), n.hf.format(L=layer)) for n in item.body if n.hf)
        elif item.hf:
            out.append((item.name, item.hf))
    return out


def capture_transformers(model, ids: list[int], modules: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Outputs of the named modules (batch dimension dropped) and the logits."""
    import torch

    captured: dict[str, np.ndarray] = {}
    handles = []
    named = dict(model.named_modules())
    for path in modules:
        mod = named.get(path)
        if mod is None:
            continue

        def hook(_m, _inp, out, path=path):
            # a tensor, a tuple, or a ModelOutput (a whole model's: its first field is the hidden states)
            t = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
            a = t.detach().float().numpy()
            # the batch of one dropped; some modules see the tokens flattened ([tokens * heads, d], MoE [tokens, d])
            a = a[0] if a.ndim > 1 and a.shape[0] == 1 else a
            captured[path] = a.copy()  # later in-place ops (falcon: mlp_output += attn) must not change it

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), _experts_in_token_order(model):
            from porter.parity.logits import model_output

            logits = model_output(model(torch.tensor([ids]), use_cache=False))[0].float().numpy()
    finally:
        for h in handles:
            h.remove()
    return captured, logits


@contextlib.contextmanager
def _experts_in_token_order(model):
    """Mixture-of-experts layers computed per token (transformers' ``batched_mm``, the same numbers
    as its default grouped kernel), so the modules inside the experts see every token's rows in
    token order, as porter's nodes hold them, not grouped by expert."""
    can = getattr(model, "_can_set_experts_implementation", None)
    before = getattr(model.config, "_experts_implementation", None)
    if can is None or not can() or before in (None, "batched_mm"):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(before)


def run_parity(hf_model, porter_model, ids: list[int], outtype: str = "f32") -> ParityReport:
    """Compare every mapped node and the logits; tolerance from TOLERANCES[outtype]."""
    tol = tolerance(outtype)
    targets = hf_targets(porter_model.spec)
    hf_out, ref_logits = capture_transformers(hf_model, ids, [m for _, m in targets])
    porter_model.reset()
    logits, nodes = porter_model.forward(ids, use_cache=False, all_logits=True, capture=[n for n, _ in targets])
    report = ParityReport(outtype=outtype, tolerance=tol["nmse"], n_tokens=len(ids))
    for node, module in targets:
        if module not in hf_out or node not in nodes:
            continue
        ref = hf_out[module]
        got = nodes[node].reshape(ref.shape) if nodes[node].size == ref.size else nodes[node]
        if got.shape != ref.shape:
            role, layer = _split(node)
            report.nodes.append(NodeParity(node, module, layer, role, float("inf"), float("inf"), 0.0, False))
            continue
        role, layer = _split(node)
        e = nmse(ref, got)
        gated = outtype.lower() == "f32" or role in STREAM_ROLES
        report.nodes.append(NodeParity(node, module, layer, role, e, max_abs(ref, got), cosine(ref, got),
                                       e <= tol["nmse"], gated, bool(np.isfinite(got).all()),
                                       bool(np.isfinite(ref).all())))
    e = nmse(ref_logits, logits)
    top1 = top1_agreement(ref_logits, logits)
    # Top-1 is gated on positions where transformers' winner leads clearly (by 5x the RMS
    # error): on random tiny models near-ties flip under quantization noise without being wrong.
    rms = float(np.sqrt(np.mean((ref_logits.astype(np.float64) - logits) ** 2)))
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 5 * rms
    top1_clear = top1_agreement(ref_logits[clear], logits[clear]) if clear.any() else 1.0
    report.logits = {"nmse": e, "max_abs": max_abs(ref_logits, logits), "top1": top1,
                     "top1_clear": top1_clear, "clear_positions": int(clear.sum()),
                     "kl": kl_divergence(ref_logits, logits),
                     "ok": e <= tol["nmse"] and top1_clear >= tol["top1"],
                     "finite": bool(np.isfinite(logits).all()), "ref_finite": bool(np.isfinite(ref_logits).all())}
    porter_model.reset()
    return report
