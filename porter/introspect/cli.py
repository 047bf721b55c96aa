"""``porter inspect MODEL``: what porter sees in a checkpoint folder or a transformers model_type
(a GGUF file: porter.inspect_gguf)."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any

import click

__all__ = ["inspect", "inspect_command"]


@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON instead of a summary.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow running the modeling code shipped in the checkpoint (read it first).",
)
@click.option(
    "--modules/--no-modules",
    default=True,
    show_default=True,
    help="Include the module tree (collapsed over repeated layers) and module-class counts.",
)
@click.option("--revision", help="With a model id: the branch, tag or commit.")
def inspect_command(model: str, as_json: bool, trust_remote_code: bool, modules: bool, revision: str | None) -> None:
    """Show hyperparameters, module tree, ancestry and parameters of MODEL.

    MODEL is a checkpoint folder (config.json + *.safetensors), a Hugging Face model id
    (organisation/name: the local hub cache when offline), a transformers model_type such as
    "qwen3" (its default configuration), or a .gguf file (architecture, hparams, tensor types and
    sizes, tokenizer, graph spec). No weights are loaded.
    """
    from porter.inspect_gguf import format_summary, gguf_summary, is_gguf, to_json

    if is_gguf(model):
        summary = gguf_summary(model)
        click.echo(to_json(summary) if as_json else format_summary(summary))
        return
    if model.endswith(".gguf"):
        from porter.errors import ModelError

        raise ModelError(f"{model}: no such GGUF file (or not one: no GGUF magic)")
    from pathlib import Path

    from porter.introspect import introspect

    source = model
    if revision or (re.fullmatch(r"[\w.\-]+/[\w.\-]+", model) and not Path(model).exists()):
        from porter.pipeline import checkpoint_folder

        source, _ = checkpoint_folder(model, revision)
    info = introspect(source, trust_remote_code=trust_remote_code)
    if as_json:
        data = info.to_json()
        if not modules:
            data.pop("modules", None)
        click.echo(json.dumps(data, indent=2))
        return
    _print_summary(info, show_modules=modules)


# ----------------------------------------------------------------------------------------------


def _fmt_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        counts = Counter(map(str, value))
        inner = ", ".join(f"{k}×{c}" for k, c in counts.most_common())
        return f"[{len(value)} items: {inner}]"
    return str(value)


def _layer_types_summary(layer_types: tuple[str, ...]) -> str:
    counts = Counter(layer_types)
    text = ", ".join(f"{t}×{c}" for t, c in counts.items())
    # Smallest repeating pattern, if any (gemma3: 5 sliding then 1 full).
    n = len(layer_types)
    for period in range(1, n // 2 + 1):
        if all(layer_types[i] == layer_types[i % period] for i in range(n)) and period < n:
            if period > 1:
                runs = []
                for t in layer_types[:period]:
                    if runs and runs[-1][0] == t:
                        runs[-1][1] += 1
                    else:
                        runs.append([t, 1])
                text += " (repeating " + " + ".join(f"{c} {t}" for t, c in runs) + ")"
            break
    return f"{n} layers: {text}"


_INDEX = re.compile(r"^\d+$")


def _collapsed_tree(modules: list[tuple[str, str]]):
    """Module tree with numbered children (layers.0, layers.1...) collapsed into one node."""
    from rich.tree import Tree

    # pattern path (tuple of segments, numbers as "#") -> classes seen, indices seen per level
    classes: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    indices: dict[tuple[str, ...], set[int]] = defaultdict(set)
    order: list[tuple[str, ...]] = []
    for path, cls in modules:
        parts = tuple(path.split(".")) if path else ()
        pattern = tuple("#" if _INDEX.match(p) else p for p in parts)
        if pattern not in classes:
            order.append(pattern)
        classes[pattern][cls] += 1
        if parts and _INDEX.match(parts[-1]):
            indices[pattern].add(int(parts[-1]))

    def label(pattern: tuple[str, ...]) -> str:
        name = pattern[-1] if pattern else "(root)"
        if name == "#":
            idx = sorted(indices[pattern])
            name = f"[{idx[0]}..{idx[-1]}]" if len(idx) > 1 else f"[{idx[0]}]"
            name = name.replace("[", "\\[")
        cls = classes[pattern]
        cls_text = " | ".join(f"{c}" + (f" ×{n}" if n > 1 else "") for c, n in cls.most_common())
        return f"[bold]{name}[/bold]  [cyan]{cls_text}[/cyan]"

    root = Tree(label(()))
    nodes = {(): root}
    for pattern in order:
        if not pattern:
            continue
        parent = nodes.get(pattern[:-1], root)
        nodes[pattern] = parent.add(label(pattern))
    return root


def _print_summary(info, *, show_modules: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    h = info.hparams
    console.rule(f"[bold]{info.source}[/bold]")
    console.print(
        f"model_type [bold]{info.model_type}[/bold]   class [bold]{info.model_class}[/bold] "
        f"(via {info.auto_class})   architectures {', '.join(info.architectures) or '-'}"
    )

    table = Table(title="Hyperparameters", show_header=True, header_style="bold")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in h.__dataclass_fields__:
        if name in ("extra", "model_type"):
            continue
        value = getattr(h, name)
        if name == "layer_types" and value:
            text = _layer_types_summary(value)
        elif name == "rope_by_layer_type" and value:
            text = "; ".join(f"{k}: {_fmt_value(v)}" for k, v in value.items())
        elif name == "hidden_act":
            text = f"{value} (config: {h.hidden_act_raw})" if h.hidden_act_raw != value else str(value)
        elif name == "hidden_act_raw":
            continue
        else:
            text = "-" if value is None else _fmt_value(value)
        table.add_row(name, text)
    for key, value in h.extra.items():
        table.add_row(f"[dim]extra.{key}[/dim]", "-" if value is None else _fmt_value(value))
    console.print(table)

    if show_modules and info.modules:
        console.print("[bold]Module tree[/bold] (numbered children collapsed)")
        console.print(_collapsed_tree(info.modules))
        counts = Table(title="Module classes", header_style="bold")
        counts.add_column("class")
        counts.add_column("count", justify="right")
        for cls, n in sorted(info.module_classes().items(), key=lambda kv: (-kv[1], kv[0])):
            counts.add_row(cls, str(n))
        console.print(counts)

    used = {cls for _, cls in info.modules}
    if info.ancestry:
        anc = Table(title="Ancestry (transformers modular files)", header_style="bold")
        anc.add_column("class")
        anc.add_column("derives from (nearest first)", overflow="fold")
        shown = 0
        for cls, chain in info.ancestry.items():
            if cls in used:
                anc.add_row(cls, " ← ".join(chain))
                shown += 1
        if shown:
            console.print(anc)
        others = len(info.ancestry) - shown
        if others:
            console.print(f"[dim]{others} more classes of the modular file are not in this model's tree "
                          f"(see --json).[/dim]")
    else:
        console.print("[dim]Ancestry: none (no modular file for this model in transformers).[/dim]")

    params = info.parameters
    dtypes = Counter(info.parameter_dtypes.values())
    dtype_text = (" in " + ", ".join(f"{d}×{n}" for d, n in dtypes.most_common())) if dtypes else ""
    console.print(
        f"[bold]Parameters[/bold]: {_fmt_count(info.num_parameters)} ({info.num_parameters:,}) in "
        f"{len(params)} tensors{dtype_text}"
        + (f" from {', '.join(info.files)}" if info.files else " (what transformers would save)")
    )
    largest = sorted(params.items(), key=lambda kv: -_numel(kv[1]))[:5]
    big = Table(title="Largest tensors", header_style="bold")
    big.add_column("name", overflow="fold")
    big.add_column("shape")
    big.add_column("elements", justify="right")
    for name, shape in largest:
        big.add_row(name, "×".join(map(str, shape)) or "scalar", _fmt_count(_numel(shape)))
    console.print(big)

    for note in info.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if info.checkpoint_diff:
        for key in ("missing", "unexpected"):
            names = info.checkpoint_diff[key]
            if names:
                more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
                console.print(f"  {key}: {', '.join(names[:5])}{more}")
        for name, shapes in list(info.checkpoint_diff["shape_mismatch"].items())[:5]:
            console.print(f"  shape mismatch: {name}: checkpoint {shapes['checkpoint']}, expected {shapes['expected']}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
inspect = inspect_command  # the name porter/cli.py may import
