"""`porter port SOURCE`: the one command. A plugin's declared port when one claims the model,
else the traced path (torch.export); then the GGUF and the parity certificate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

OUTTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"]


@click.command("port")
@click.argument("source")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="GGUF to write (default: <checkpoint>.<outtype>.gguf here; a model type's tiny model "
                   "is ported into a temporary file unless -o is given).")
@click.option("-t", "--outtype", type=click.Choice(OUTTYPES, case_sensitive=False), default="f32",
              show_default=True, help="Weight type of the matrices.")
@click.option("--traced", is_flag=True, help="Take the traced path even if a plugin claims the model (cross-check).")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Where op gaps stop the port: write the op-gap report as JSON here.")
@click.option("--spec", "spec_path", type=click.Path(path_type=Path), help="Write the graph spec (JSON) here.")
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt(s) for the parity certificate (repeatable).")
@click.option("--greedy", "n_greedy", default=16, show_default=True, help="Greedy tokens compared in the certificate.")
@click.option("--no-parity", is_flag=True, help="Write the GGUF without the certificate (transformers not run).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the certificate as JSON.")
@click.option("--revision", help="With a model id: the revision (branch, tag or commit).")
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary lines.")
def port(source, out, outtype, traced, report_path, spec_path, prompts, n_greedy, no_parity, json_path,
         revision, force, quiet):
    """Port SOURCE to ggml: a checkpoint folder, a Hugging Face model id, or a transformers
    model_type (a tiny random model of it).

    \b
    If a plugin claims the model, its declared spec is used; otherwise the model is traced with
    torch.export at its own configuration (weights not needed for that) and lowered to porter's
    op vocabulary. Either way the GGUF is written and the parity certificate against
    transformers printed. Exit status: 0 pass, 1 over tolerance, 2 op gaps (the table, and
    --report JSON, say which ATen op is missing where).
    """
    from porter.parity.cli import run_certificate

    if revision and not ("/" in source and not Path(source).exists()):
        raise click.UsageError("--revision only applies to a model id (organisation/name)")
    del revision  # resolved by the pipeline from the local cache or the hub
    sys.exit(run_certificate(source, outtype=outtype.lower(), traced=traced, prompts=prompts, n_greedy=n_greedy,
                             json_path=json_path, quiet=quiet, out=out, force=force, report_path=report_path,
                             spec_path=spec_path, parity=not no_parity, announce=True))


def describe(console, result, spec_path: Path | None, quiet: bool) -> None:
    """Which path, what spec, which file."""
    spec = result.spec
    if result.route == "declared":
        console.print(f"[bold]route: declared[/] - plugin {result.plugin} ports model_type {result.model_type!r}")
    else:
        tp = result.traced
        from porter.traced.report import nearest_plugin

        near, _ = nearest_plugin(result.model_type)
        why = "--traced (a plugin claims this model)" if result.forced else \
            f"no porter plugin claims model_type {result.model_type!r}"
        console.print(f"[bold]route: traced[/] - {why}; torch.export of {tp.trace.model_class} "
                      f"({spec.produced_by.get('export')}), layers as a {spec.produced_by.get('layers')}"
                      + (f"; nearest declared plugin: {near}" if near else ""))
    console.print(summarize(spec))
    if spec_path:
        spec_path.write_text(spec.to_json())
        console.print(f"graph spec: {spec_path}")
    if result.write_report is not None and not quiet:
        console.print(result.write_report.summary())
    if result.route == "traced":
        console.print("[yellow]note:[/] stock llama.cpp cannot run this file (general.architecture = porter: an "
                      "architecture it does not know); porter runs it")
    console.print(f"GGUF: {result.gguf}" + (" (temporary: pass -o to keep it)" if result.tiny and
                                            result.gguf.parent.name.startswith("porter-parity-") else ""))


def summarize(spec) -> str:
    from porter.spec import Repeat

    loop = spec.layer_loop
    outside = [g for g in spec.graph if not isinstance(g, Repeat)]
    layers = int(spec.hparams.get("n_layer", 0))
    if loop is not None:
        body = f"{len(loop.body)} nodes per layer x {layers} layers (one loop)"
        varying = [k for k, v in spec.hparams.items() if isinstance(v, list) and k.startswith("layer_")]
        if varying:
            body += f", {len(varying)} per-layer value(s)"
    else:
        body = f"{len(outside)} nodes, {layers} layers unrolled"
        outside = []
    ops = sorted({n.op for item in spec.graph for n in (item.body if isinstance(item, Repeat) else [item])})
    return (f"spec v{spec.version} ({spec.architecture}): {body}, {len(outside)} outside; inputs "
            f"{', '.join(i.name for i in spec.inputs)}; {len(spec.weights)} weight patterns; ops {', '.join(ops)}")


@click.command("traced-ops")
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (docs/traced-lowering.md is this).")
@click.argument("pattern", required=False)
def traced_ops(markdown, pattern):
    """The traced path's lowering table: every ATen op it lowers and what it emits.

    An op that is not listed is an op gap: `porter port` stops with exit status 2 and names the
    op and the transformers module it appears in. PATTERN keeps the ops containing it."""
    from porter.traced.table import describe

    rows = [(op, what) for op, what in describe() if not pattern or pattern in op]
    if markdown:
        click.echo(lowering_markdown(rows), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"traced-path lowering table ({len(rows)} ATen ops and kernels)")
    table.add_column("ATen op", style="bold")
    table.add_column("lowered to")
    for op, what in rows:
        table.add_row(op, what)
    Console().print(table)


def lowering_markdown(rows=None) -> str:
    from porter.traced.table import describe

    rows = describe() if rows is None else rows
    lines = ["# The traced path's lowering table", "",
             "Generated by `porter traced-ops --markdown` from the rules' docstrings in",
             "`porter/traced/aten.py` (checked by the tests). Every ATen op of a `torch.export` graph is",
             "lowered by its rule; an op not listed here is an op gap (`porter port` exits 2 and names it).",
             "Pattern rewrites (`porter/traced/patterns.py`) run first where ggml has a fused op: RMS norm,",
             "rotary embedding, attention with the KV cache, ALiBi biases, mixture-of-experts routing.",
             "The `porter.*` ops are transformers' kernels kept whole while exporting",
             "(`porter/traced/kernels.py`: the gated delta rule, Mamba's selective scans).", "",
             f"{sum(not op.startswith('porter.') for op, _ in rows)} ATen ops, "
             f"{sum(op.startswith('porter.') for op, _ in rows)} kernels.", "", "| ATen op | lowered to |", "|---|---|"]
    lines += [f"| `{op}` | {what.replace('|', chr(92) + '|')} |" for op, what in rows]
    return "\n".join(lines) + "\n"
