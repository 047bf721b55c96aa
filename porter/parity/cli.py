"""`porter parity`: a readable per-layer table, a JSON report and a picture of error by layer."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click

from porter.cli_placement import placement_kwargs, placement_options
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


def config_settings(model_type: str, settings) -> dict:
    """``KEY=VALUE`` strings -> config overrides of ``model_type``'s tiny model; keys must be fields
    of its transformers config (transformers accepts any keyword silently, so a typo would test nothing)."""
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
        from porter.plugins import architectures
        from porter.traced.tiny import tiny_config

        arch = architectures().get(model_type)
        fields = set((arch.tiny_config() if arch is not None else tiny_config(model_type)).to_dict())
        for key in overrides:
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=3)
                raise PorterError(f"--set {key}: not a field of the {model_type} config"
                                  + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return overrides


@click.command("parity")
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--arch", "model_type", help="Instead of a checkpoint: a tiny random model of this model_type "
              "(any transformers causal LM: declared plugins' types, or the traced path for the others).")
@click.option("--traced", is_flag=True, help="Port through the traced path (torch.export) even when a plugin "
              "claims the type (a cross-check of the plugin).")
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
@click.option("--checkpoint", "checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With a GGUF file as MODEL: the transformers checkpoint it was made from (the file users run "
                   "is compared as it is, not a fresh conversion).")
@click.option("--chat", is_flag=True, help="Score each prompt as a user turn in the checkpoint's chat template "
              "(the assistant's turn opened), as chat users run the model.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary line.")
@placement_options
def parity(model_dir, model_type, traced, outtype, prompts, json_path, plot_path, n_greedy, against, settings,
           checkpoint, chat, quiet, rpc, device, n_gpu_layers):
    """Compare porter with transformers node by node (exit status 1 when over tolerance, 2 when
    the traced path cannot lower the model).

    MODEL is a checkpoint folder (converted to --outtype first) or a GGUF file with --checkpoint
    (compared as it is; its own weight type sets the gate).

    Every graph node that corresponds to a transformers module output (embeddings, norms,
    attention, MLP, each layer, logits) is compared by NMSE, max-abs error and cosine; the
    first node over the tolerance for the weight type is reported with its layer and role.

    With a quantized --outtype the difference has two parts: the rounded weights, and ggml
    computing with them. --against gguf gives transformers the GGUF's own (dequantized) weights,
    so what remains is the port's.

    With --rpc/--device/-ngl, porter's side runs split across those devices (as `porter run`
    would), still compared with transformers; the report says how the layers were split.
    """
    where = placement_kwargs(rpc, device, n_gpu_layers)
    where = where if any(v is not None for v in where.values()) else None
    if (model_dir is None) == (model_type is None):
        raise PorterError("give either a checkpoint folder (or a GGUF file with --checkpoint) or --arch MODEL_TYPE")
    if quiet:  # transformers' "Loading weights" bar too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if model_dir is not None and model_dir.is_file():
        if checkpoint is None:
            raise PorterError(f"{model_dir} is a file: to compare a GGUF, name the checkpoint it was made from "
                              "with --checkpoint DIR")
        if traced or settings:
            raise PorterError("--traced and --set apply when porter converts; a GGUF file is compared as it is")
        sys.exit(run_file_certificate(model_dir, checkpoint, prompts=prompts, n_greedy=n_greedy, against=against,
                                      json_path=json_path, plot_path=plot_path, quiet=quiet, chat=chat,
                                      placement=where))
    if checkpoint is not None:
        raise PorterError("--checkpoint goes with a GGUF file as MODEL (a folder is its own checkpoint)")
    if settings and model_type is None:
        raise PorterError("--set changes the tiny model of --arch; a checkpoint folder keeps its own config.json")
    source = model_type or str(model_dir)
    overrides = config_settings(model_type, settings) if settings else None
    sys.exit(run_certificate(source, outtype=outtype, traced=traced, prompts=prompts, n_greedy=n_greedy,
                             against=against, json_path=json_path, plot_path=plot_path, quiet=quiet,
                             overrides=overrides, chat=chat, placement=where))


def file_outtype(gguf: Path) -> str:
    """The weight type a GGUF says it holds (general.file_type), as porter's gates name types."""
    from gguf import LlamaFileType

    from porter.convert.writer import OUTTYPES
    from porter.runtime.gguf_file import GGUFFile

    with GGUFFile(gguf) as reader:
        code = reader.get("general.file_type")
    by_code = {int(ft): name for name, (_, ft) in OUTTYPES.items()}
    if code in by_code:
        return by_code[code]
    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_").lower()
    except (ValueError, TypeError):
        return "unknown"


def run_file_certificate(gguf: Path, checkpoint: Path, *, prompts, n_greedy: int, against: str,
                         json_path: Path | None, plot_path: Path | None, quiet: bool, chat: bool,
                         placement: dict | None = None) -> int:
    """Compare a GGUF as it is with transformers on ``checkpoint``; the exit status."""
    from rich.console import Console

    from porter.parity import certificate
    from porter.parity.logits import load_reference

    import porter

    console = Console()
    outtype = file_outtype(gguf)
    with porter.load(gguf) as m:
        traced = "traced" in m.spec.produced_by
    with tempfile.TemporaryDirectory(prefix="porter-parity-") as tmp:
        reference = checkpoint
        if against == "gguf":
            if traced:
                raise PorterError("--against gguf needs the plan the file was written from; a traced file keeps "
                                  "checkpoint names: compare --against checkpoint")
            from porter.parity.same_weights import checkpoint_with_gguf_weights
            from porter.pipeline import architecture

            plan = architecture(checkpoint).conversion_plan()
            reference = Path(tmp) / "gguf-weights"
            checkpoint_with_gguf_weights(checkpoint, plan, gguf, reference)
        hf, tok = load_reference(reference, traced=traced)
        reports = certificate.measure(hf, tok, gguf, outtype, prompts, n_greedy, chat=chat, placement=placement)
    weights = "the GGUF's weights" if against == "gguf" else "the checkpoint's weights"
    title = (f"parity of {gguf.name} ({outtype}, {reports[0].n_tokens} tokens{', chat' if chat else ''}, worst "
             f"prompt; transformers on {weights})")
    ok = certificate.show(console, reports, title=title, outtype=outtype, quiet=quiet)
    if json_path:
        certificate.write_json(json_path, str(gguf), prompts, reports, {"checkpoint": str(checkpoint), "chat": chat})
        console.print(f"JSON report: {json_path}")
    if plot_path:
        plot(max(reports, key=lambda r: r.badness), plot_path, f"porter vs transformers: {gguf.name} ({outtype})")
        console.print(f"picture: {plot_path}")
    return 0 if ok else 1


def run_certificate(source: str, *, outtype: str, traced: bool, prompts, n_greedy: int, against: str = "checkpoint",
                    json_path: Path | None = None, plot_path: Path | None = None, quiet: bool = False,
                    out: Path | None = None, force: bool = False, report_path: Path | None = None,
                    spec_path: Path | None = None, parity: bool = True, announce: bool = False,
                    overrides: dict | None = None, chat: bool = False, placement: dict | None = None) -> int:
    """Port ``source`` (to a temporary GGUF unless ``out``), compare it with transformers and
    print the certificate; returns the exit status (0 pass, 1 over tolerance, 2 op gaps)."""
    from rich.console import Console

    from porter.parity import certificate
    from porter.parity.logits import load_reference
    from porter.pipeline import port
    from porter.traced.export import ExportFailed
    from porter.traced.port import OpGaps
    from porter.traced.report import GapReport

    console = Console()
    with tempfile.TemporaryDirectory(prefix="porter-parity-") as tmp:
        tmp = Path(tmp)
        try:
            result = port(source, out=out or tmp / "model.gguf", outtype=outtype, traced=traced, workdir=tmp,
                          force=force or out is None, progress=announce and not quiet, overrides=overrides)
        except (OpGaps, ExportFailed) as exc:
            model_type = source if "/" not in source and not Path(source).is_dir() else source
            gaps = exc.report if isinstance(exc, OpGaps) else GapReport.export_failed(model_type, str(exc))
            console.print(gaps.rich_table())
            console.print(gaps.summary())
            if report_path:
                report_path.write_text(gaps.to_json())
                console.print(f"op-gap report: {report_path}")
            return 2
        if announce:
            from porter.port_cli import describe

            describe(console, result, spec_path, quiet)
        if not parity:
            return 0
        if against == "gguf":
            from porter.parity.same_weights import checkpoint_with_gguf_weights

            checkpoint_with_gguf_weights(result.checkpoint, result.plan, result.gguf, tmp / "gguf-weights")
            hf, tok = load_reference(tmp / "gguf-weights", traced=result.route == "traced")
        else:
            hf, tok = load_reference(result.checkpoint, traced=result.route == "traced")
        reports = certificate.measure(hf, tok, result.gguf, outtype, prompts, n_greedy, chat=chat,
                                      placement=placement)
    weights = "the GGUF's weights" if against == "gguf" else "the checkpoint's weights"
    name = source if result.tiny else Path(str(source)).name
    title = (f"parity of {name} ({result.route} path, {outtype}, {reports[0].n_tokens} tokens, worst prompt; "
             f"transformers on {weights})")
    ok = certificate.show(console, reports, title=title, outtype=outtype, quiet=quiet)
    if json_path:
        certificate.write_json(json_path, str(source), prompts, reports, {"route": result.route})
        console.print(f"JSON report: {json_path}")
    if plot_path:
        worst = max(reports, key=lambda r: r.badness)
        plot(worst, plot_path, f"porter vs transformers: {name} ({outtype}, {result.route})")
        console.print(f"picture: {plot_path}")
    return 0 if ok else 1
