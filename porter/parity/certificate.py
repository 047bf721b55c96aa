"""The parity certificate `porter parity` and `porter port` print: transformers against a GGUF,
node by node, per prompt, with greedy decoding compared too."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog because"


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt`` as transformers gives them: plain text with the tokenizer's special
    tokens, or (``chat``) a user turn rendered by the checkpoint's chat template with the
    assistant's turn opened, tokenized as ``apply_chat_template`` does (no special tokens added:
    the template writes them)."""
    if not chat:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        from porter.errors import ModelError

        raise ModelError("--chat: the checkpoint's tokenizer has no chat template; score plain prompts instead")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def measure(hf, tokenizer, gguf: Path, outtype: str, prompts, n_greedy: int = 16, n_ctx: int = 512,
            chat: bool = False, placement: dict | None = None) -> list:
    """One :class:`~porter.parity.harness.ParityReport` per prompt (greedy tokens in ``logits``).
    ``placement``: porter.load's ``rpc``/``devices``/``n_gpu_layers``, to check porter split
    across devices against transformers (the report's ``placement`` says how it was split)."""
    import porter
    from porter.parity.harness import run_parity
    from porter.parity.logits import hf_greedy

    reports = []
    with porter.load(gguf, n_ctx=n_ctx, **(placement or {})) as m:
        split = m.backend.layers_per_device() if hasattr(m.backend, "layers_per_device") else None
        for p in list(prompts) or [DEFAULT_PROMPT]:
            ids = prompt_ids(tokenizer, p, chat) if tokenizer is not None else list(range(1, 17))
            report = run_parity(hf, m, ids, outtype)
            if n_greedy and m.spec.causal:
                ref_tokens = hf_greedy(hf, ids, n_greedy)
                got_tokens = list(m.generate_ids(ids, n_greedy))
                same = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), None)
                report.logits["greedy"] = {"tokens": n_greedy, "identical": same is None, "first_difference": same}
            report.placement = split
            reports.append(report)
    return reports


def passed(reports) -> bool:
    return all(r.passed for r in reports)


def show(console, reports, *, title: str, outtype: str, quiet: bool = False) -> bool:
    """Print the table of the worst prompt, the logits summary and the verdict; True on PASS."""
    from rich.table import Table

    report = max(reports, key=lambda r: r.badness)  # the worst prompt is shown
    if not quiet:
        table = Table(title=title)
        for col in ("node", "transformers module", "NMSE", "max |err|", "cosine", ""):
            table.add_column(col)
        for n in report.nodes:
            table.add_row(n.node, n.hf_module, f"{n.nmse:.2e}", f"{n.max_abs:.2e}", f"{n.cosine:.8f}",
                          "[green]ok" if n.ok else "[red]not finite" if not n.finite
                          else "[red]over" if n.gated else "[yellow]over (not gated)")
        console.print(table)
    if report.placement:
        console.print("porter split its layers: " + ", ".join(f"{d} {n}" for d, n in report.placement.items()))
    lg = report.logits
    gate = f"gate {report.tolerance:g}" if report.tolerance != float("inf") else f"no gate for {outtype}: report only"
    console.print(f"logits: NMSE {lg['nmse']:.3e} ({gate}), top-1 agreement {lg['top1']:.1%}, KL {lg['kl']:.2e}")
    for i, r in enumerate(reports):
        g = r.logits.get("greedy")
        if g:
            state = "identical" if g["identical"] else f"differ from step {g['first_difference']}"
            console.print(f"prompt {i + 1}: greedy {g['tokens']} tokens {state}")
    first = report.first_divergence
    if first:
        console.print(f"[red]first diverging node: {first.node} (layer {first.layer}, role {first.role}, "
                      f"transformers {first.hf_module}) NMSE {first.nmse:.3e}")
    elif report.first_over and not quiet:
        console.print(f"[yellow]branch outputs over {report.tolerance:g} are not gated for {outtype} (rounded "
                      "weights): only the residual stream and the outputs are")
    _show_nonfinite(console, report)
    ok = passed(reports)
    if report.tolerance == float("inf") and report.finite and report.first_nonfinite is None:
        console.print(f"REPORT ONLY: porter has no parity tolerance for {outtype} (gates exist for "
                      "f32, f16, bf16 and q8_0)")
    else:
        console.print("[green]PASS" if ok else "[red]FAIL")
    return ok


def _show_nonfinite(console, report) -> None:
    """Say where values stop being finite: porter's first such node, or transformers' own."""
    ref = report.reference_nonfinite
    if ref is not None or not report.logits.get("ref_finite", True):
        where = f"from {ref.hf_module} (porter node {ref.node})" if ref else "in its logits"
        console.print(f"[red]transformers itself computes NaN or infinity {where}: the checkpoint's weights or "
                      "config produce them, not the port (check them with `porter verify` after converting)")
    bad = report.first_nonfinite
    if bad is not None:
        console.print(f"[red]porter computes NaN or infinity from node {bad.node} (layer {bad.layer}, role "
                      f"{bad.role}, transformers {bad.hf_module}), where transformers' values are finite")
    elif not report.finite:
        console.print("[red]porter's logits hold NaN or infinity (every compared node before them is finite)")


def write_json(path: Path, model: str, prompts, reports, extra: dict | None = None) -> None:
    data = {"model": model, "prompts": list(prompts) or [DEFAULT_PROMPT], "reports": [r.as_dict() for r in reports]}
    data.update(extra or {})
    Path(path).write_text(json.dumps(data, indent=1))
