"""Rendering block templates into graph-spec JSON."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    # Templates here are porter's own (trusted); checkpoint chat templates use a sandbox elsewhere.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.do"],
        autoescape=False,
        keep_trailing_newline=True,
    )


def render_graph(template: str, knobs: dict[str, Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """Render a layout template; returns {"graph": [...], "outputs": [...]}."""
    text = environment().get_template(template).render(k=_Knobs(knobs), hp=hparams)
    return json.loads(text)


class _Knobs(dict):
    """Knob access as attributes in templates (``k.norm``), failing loudly on a typo."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"template asked for knob {name!r}, which no plugin sets") from None
