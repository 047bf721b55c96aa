"""The README's support table, generated from porter's own plugins (never written by hand)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def rows(measure: bool = False) -> list[dict]:
    """One row per model type of porter's own plugins; with ``measure``, a tiny random model is ported and compared
    with transformers right now (f32, 24 tokens) and its logits NMSE recorded."""
    from porter.plugins import builtin_architectures

    out = []
    for model_type, cls in builtin_architectures().items():
        row = {
            "model_type": model_type, "family": cls.family, "gguf_arch": cls.gguf_arch,
            "features": ", ".join(cls.features),
            "plugin": f"{cls.__module__.replace('.', '/')}.py ({len(inspect.getsource(inspect.getmodule(cls)).splitlines())} lines)",
        }
        if measure:
            import tempfile

            from porter.parity.harness import run_parity
            from porter.testing.parity import port_tiny

            with tempfile.TemporaryDirectory() as tmp, port_tiny(model_type, None, tmp) as pair:
                report = run_parity(pair.hf, pair.porter, list(range(1, 25)), "f32")
            row["parity"] = f"{'pass' if report.passed else 'FAIL'} (NMSE {report.logits['nmse']:.0e})"
        out.append(row)
    return out


def markdown(measure: bool = False) -> str:
    data = rows(measure)
    cols = ["model_type", "family", "gguf_arch", "features", "plugin"] + (["parity"] if measure else [])
    heads = {"model_type": "model type", "gguf_arch": "GGUF arch",
             "parity": "parity (tiny model, f32 logits, measured at generation)"}
    lines = ["| " + " | ".join(heads.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in data]
    return "\n".join(lines) + "\n"


def update_readme(measure: bool = True) -> None:
    replace_block(START, END, markdown(measure))


def replace_block(start: str, end: str, content: str, readme: Path = README) -> None:
    """Put ``content`` between the ``start`` and ``end`` markers of the README (appended when absent)."""
    text = readme.read_text()
    block = f"{start}\n{content}{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    readme.write_text(text)


def readme_model_types() -> list[str]:
    text = README.read_text()
    if START not in text:
        return []
    block = text.split(START, 1)[1].split(END, 1)[0]
    return [line.split("|")[1].strip() for line in block.strip().splitlines()[2:]]
