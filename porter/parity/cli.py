"""`porter parity`: a readable per-layer table, a JSON report and a picture of error by layer."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from porter.errors import PorterError

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog because"


def plot(report, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles: dict[str, list[tuple[int, float]]] = {}
    for n in report.nodes:
        if n.layer is not None:
            roles.setdefault(n.role, []).append((n.layer, max(n.nmse, 1e-20)))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for role, pts in roles.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=role)
    ax.axhline(report.tolerance, color="red", ls="--", lw=1, label=f"gate {report.tolerance:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("NMSE vs transformers")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def config_settings(arch_cls, settings) -> dict:
    """``KEY=VALUE`` strings -> config overrides of ``arch_cls``'s tiny model; keys must be fields of
    its transformers config (transformers accepts any keyword silently, so a typo would test nothing)."""
    import difflib

    overrides = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PorterError(f"--set {item!r}: write KEY=VALUE, e.g. --set clip_qkv=0.5")
        try:
            overrides[key] = json.loads(raw)
        except ValueError:
            overrides[key] = raw
    if overrides:
        fields = set(arch_cls.tiny_config().to_dict())
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=3)
                raise PorterError(f"--set {key}: not a field of the {arch_cls.model_type} config"
                                  + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return overrides


@click.command("parity")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--arch", "model_type", help="Instead of a checkpoint: a tiny random model of this model_type.")
@click.option("-t", "--outtype", default="f32", show_default=True, help="GGUF weight type to test.")
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt(s) to compare on (repeatable).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG of error by layer.")
@click.option("--greedy", "n_greedy", default=16, show_default=True,
              help="Also decode this many tokens greedily on both sides and compare them.")
@click.option("--against", type=click.Choice(["checkpoint", "gguf"]), default="checkpoint", show_default=True,
              help="Reference weights for transformers: the checkpoint's own, or the values the GGUF stores "
                   "(rounded to --outtype), which leaves only the runtime's own error.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="With --arch: a config field of the tiny model (VALUE read as JSON, else as text); repeatable, "
                   "e.g. --set clip_qkv=0.5 --set num_hidden_layers=3.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line.")
def parity(model_dir, model_type, outtype, prompts, json_path, plot_path, n_greedy, against, settings, quiet):
    """Compare porter with transformers node by node (exit status 1 when over tolerance).

    Every graph node that corresponds to a transformers module output (embeddings, norms,
    attention, MLP, each layer, logits) is compared by NMSE, max-abs error and cosine; the
    first node over the tolerance for the weight type is reported with its layer and role.

    With a quantized --outtype the difference has two parts: the rounded weights, and ggml
    computing with them. --against gguf gives transformers the GGUF's own (dequantized) weights,
    so what remains is the port's.
    """
    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.parity.harness import run_parity
    from porter.parity.logits import load_reference
    from porter.pipeline import convert

    if (model_dir is None) == (model_type is None):
        raise PorterError("give either a checkpoint folder or --arch MODEL_TYPE")
    if settings and model_type is None:
        raise PorterError("--set changes the tiny model of --arch; a checkpoint folder keeps its own config.json")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="porter-parity-") as tmp:
        tmp = Path(tmp)
        if model_type:
            from porter.plugins import architectures
            from porter.testing.models import tiny_checkpoint

            archs = architectures()
            if model_type not in archs:
                raise PorterError(f"no plugin ports {model_type!r}; known: {', '.join(archs)}")
            model_dir = tiny_checkpoint(archs[model_type], tmp / "ckpt", **config_settings(archs[model_type], settings))
        convert(model_dir, tmp / "model.gguf", outtype, progress=False)
        if against == "gguf":
            from porter.parity.same_weights import checkpoint_with_gguf_weights
            from porter.pipeline import architecture

            plan = architecture(model_dir).conversion_plan()
            checkpoint_with_gguf_weights(model_dir, plan, tmp / "model.gguf", tmp / "gguf-weights")
            hf, tok = load_reference(tmp / "gguf-weights")
        else:
            hf, tok = load_reference(model_dir)
        prompts = list(prompts) or [DEFAULT_PROMPT]
        reports = []
        with porter.load(tmp / "model.gguf", n_ctx=512) as m:
            for p in prompts:
                ids = tok(p)["input_ids"] if tok is not None else list(range(1, 17))
                report = run_parity(hf, m, ids, outtype)
                if n_greedy and m.spec.causal:
                    from porter.parity.logits import hf_greedy

                    ref_tokens = hf_greedy(hf, ids, n_greedy)
                    got_tokens = list(m.generate_ids(ids, n_greedy))
                    same = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), None)
                    report.logits["greedy"] = {"tokens": n_greedy, "identical": same is None,
                                               "first_difference": same}
                reports.append(report)
    report = max(reports, key=lambda r: r.logits["nmse"])  # the worst prompt is shown
    if not quiet:
        weights = "the GGUF's weights" if against == "gguf" else "the checkpoint's weights"
        table = Table(title=f"parity of {model_dir} ({outtype}, {report.n_tokens} tokens, worst prompt; "
                            f"transformers on {weights})")
        for col in ("node", "transformers module", "NMSE", "max |err|", "cosine", ""):
            table.add_column(col)
        for n in report.nodes:
            table.add_row(n.node, n.hf_module, f"{n.nmse:.2e}", f"{n.max_abs:.2e}", f"{n.cosine:.8f}",
                          "[green]ok" if n.ok else "[red]over" if n.gated else "[yellow]over (not gated)")
        console.print(table)
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
    if json_path:
        json_path.write_text(json.dumps({"model": str(model_dir), "prompts": prompts,
                                         "reports": [r.as_dict() for r in reports]}, indent=1))
        console.print(f"JSON report: {json_path}")
    if plot_path:
        plot(report, plot_path, f"porter vs transformers: {Path(str(model_dir)).name} ({outtype})")
        console.print(f"picture: {plot_path}")
    passed = all(r.passed for r in reports)
    if report.tolerance == float("inf"):
        console.print(f"REPORT ONLY: porter has no parity tolerance for {outtype} (gates exist for "
                      "f32, f16, bf16 and q8_0)")
    else:
        console.print("[green]PASS" if passed else "[red]FAIL")
    sys.exit(0 if passed else 1)
