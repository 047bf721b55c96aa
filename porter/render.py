"""Rendering block templates into graph-spec JSON.

The template path: porter's ``templates/`` (names ``"blocks.j2"``, also ``"porter/blocks.j2"``),
then each plugin's folders by namespace (hook ``porter_templates``: ``"<namespace>/file.j2"``).

Block slots: the layouts call their sublayers through ``block(k, slot)``, which is porter's macro
of that name unless the knob ``blocks`` maps the slot to a plugin's macro
(``{"mlp": "mine/blocks.j2:my_mlp"}``). Each slot's macro takes the arguments of porter's macro
and names its result as porter's does (:data:`SLOTS`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2

from porter.errors import PorterError, SpecError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

# slot -> (porter's macro in blocks.j2, its signature, the node it must produce)
SLOTS: dict[str, tuple[str, str, str]] = {
    "norm": ("norm", "(g, k, base, sfx, x, w, hf=none, eps=\"$norm_eps\", bias=none)", "base ~ sfx"),
    "attention": ("attention", "(g, k, sfx, x, blk, hf_attn)", "\"attn_out\" ~ sfx"),
    "mlp": ("mlp", "(g, k, sfx, x, blk, hf_mlp)", "\"ffn_out\" ~ sfx"),
    "activation": ("activation", "(g, k, base, sfx, x)", "base ~ sfx"),
}


def template_dirs() -> dict[str, Path]:
    """Namespace -> folder of every plugin's templates (hook porter_templates)."""
    from porter.plugins import manager

    dirs: dict[str, Path] = {}
    for impl in manager().hook.porter_templates.get_hookimpls():
        answer = impl.function() or {}
        for namespace, folder in answer.items():
            folder = Path(folder).resolve()
            if namespace == "porter" or "/" in namespace or not namespace:
                raise PorterError(f"plugin {impl.plugin_name}: template namespace {namespace!r} is not allowed "
                                  "('porter' is porter's own; use one word, such as your package's name)")
            if not folder.is_dir():
                raise PorterError(f"plugin {impl.plugin_name}: template folder {folder} (namespace {namespace!r}) "
                                  "does not exist")
            if namespace in dirs and dirs[namespace] != folder:
                raise PorterError(f"two plugins use the template namespace {namespace!r}: {dirs[namespace]} and {folder}")
            dirs[namespace] = folder
    return dict(sorted(dirs.items()))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    # Templates here are porter's and installed plugins' (trusted code, like the plugins'
    # Python); checkpoint chat templates use a sandbox elsewhere.
    own = jinja2.FileSystemLoader(str(TEMPLATE_DIR))
    prefixed = {"porter": own, **{ns: jinja2.FileSystemLoader(str(d)) for ns, d in template_dirs().items()}}
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.PrefixLoader(prefixed, delimiter="/"), own]),
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.do"],
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.globals["block"] = functools.partial(_block, env)
    return env


def _block(env: jinja2.Environment, k: Any, slot: str):
    """The macro a layout calls for ``slot``: porter's, or the one the ``blocks`` knob names."""
    if slot not in SLOTS:
        raise SpecError(f"template asked for block slot {slot!r}; slots: {', '.join(SLOTS)}")
    ref = (k.get("blocks") or {}).get(slot)
    template, macro = ("blocks.j2", SLOTS[slot][0]) if not ref else _split_ref(ref, slot)
    try:
        module = env.get_template(template).module
    except jinja2.TemplateNotFound:
        raise SpecError(f"knob blocks[{slot!r}] = {ref!r}: no template {template!r} on porter's template path "
                        f"(porter's own, and plugin namespaces {', '.join(template_dirs()) or 'none'})") from None
    fn = getattr(module, macro, None)
    if not isinstance(fn, jinja2.runtime.Macro):
        raise SpecError(f"knob blocks[{slot!r}] = {ref!r}: {template} defines no macro {macro!r}")
    return fn


def _split_ref(ref: str, slot: str) -> tuple[str, str]:
    template, sep, macro = str(ref).rpartition(":")
    if not sep or not template or not macro:
        raise SpecError(f"knob blocks[{slot!r}] = {ref!r}: write 'namespace/file.j2:macro'")
    return template, macro


def render_graph(template: str, knobs: dict[str, Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """Render a layout template; returns {"graph": [...], "outputs": [...]}."""
    unknown = set(knobs.get("blocks") or {}) - set(SLOTS)
    if unknown:
        raise SpecError(f"knob blocks names unknown slots {sorted(unknown)}; slots: {', '.join(SLOTS)}")
    try:
        tmpl = environment().get_template(template)
    except jinja2.TemplateNotFound:
        raise SpecError(f"layout template {template!r} is not on porter's template path (porter's own, and "
                        f"plugin namespaces {', '.join(template_dirs()) or 'none'})") from None
    text = tmpl.render(k=_Knobs(knobs), hp=hparams)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"layout template {template!r} did not render JSON ({exc}); a layout ends with "
                        '{{ {"graph": g, "outputs": [...]} | tojson }}') from None


class _Knobs(dict):
    """Knob access as attributes in templates (``k.norm``), failing loudly on a typo."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"template asked for knob {name!r}, which no plugin sets") from None
