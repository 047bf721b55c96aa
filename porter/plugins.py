"""The plugin manager: loads architecture plugins from the ``porter`` entry-point group.

Plugins come from three places, in this order: installed packages (entry-point group
``porter``, porter's own built-ins included), modules named in the ``PORTER_PLUGINS``
environment variable (comma-separated module names or ``.py`` paths), and modules added with
:func:`add_plugin` (the CLI's ``porter --plugin MODULE``). The last two let an author try a
plugin without installing it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pluggy

from porter import hookspecs
from porter.errors import PorterError, UnsupportedArchitecture

hookimpl = pluggy.HookimplMarker("porter")
ENTRY_POINT_GROUP = "porter"
PLUGINS_ENV = "PORTER_PLUGINS"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "plugins"  # porter's own plugins

_added: list[str] = []  # add_plugin() specs, kept across manager rebuilds


@functools.lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("porter")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    env = [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]
    for spec in env + _added:
        _register(pm, spec)
    pm.register(_BuiltinHooks(), name="porter.builtin")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PorterError(f"a porter plugin implements a hook that does not exist: {exc}") from None
    return pm


def add_plugin(spec: str) -> None:
    """Load a plugin module that is not installed: a module name (importable from the current
    folder too) or a path to a ``.py`` file. Used by ``porter --plugin``."""
    from porter import render

    if spec not in _added:
        _added.append(spec)
    manager.cache_clear()
    render.environment.cache_clear()
    try:
        manager()  # fail now, with the module's name, rather than at the first hook call
    except PorterError:
        _added.remove(spec)
        manager.cache_clear()
        raise


def _import(spec: str):
    where = f"plugin module {spec!r} (from --plugin or {PLUGINS_ENV})"
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise PorterError(f"{where}: no such file")
            # a module inside a package (folders with __init__.py) imports under its dotted name,
            # so its own absolute imports work; either way its root folder goes on sys.path
            parts, root = [path.stem], path.parent
            while (root / "__init__.py").is_file():
                parts.insert(0, root.name)
                root = root.parent
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            name = ".".join(parts)
            module = sys.modules.get(name)
            if module is not None and getattr(module, "__file__", None) == str(path):
                return module
            if len(parts) > 1:
                return importlib.import_module(name)
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(spec)
    except PorterError:
        raise
    except Exception as exc:  # an author's module: any error of theirs becomes one clear line
        raise PorterError(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from None


def _register(pm: pluggy.PluginManager, spec: str) -> None:
    module = _import(spec)
    if pm.is_registered(module):  # installed and named again
        return
    if not any(name.startswith("porter_") for name in vars(module)):
        raise PorterError(f"plugin module {spec!r} implements no porter hook (porter_architectures, ...)")
    pm.register(module, name=module.__name__)


def architectures() -> dict[str, type]:
    """All architectures of all plugins, by transformers model_type."""
    found: dict[str, type] = {}
    for plugin_archs in manager().hook.porter_architectures():
        for arch in plugin_archs or []:
            if arch.model_type in found and found[arch.model_type] is not arch:
                raise PorterError(
                    f"two plugins port model_type {arch.model_type!r}: "
                    f"{found[arch.model_type].__module__} and {arch.__module__}; uninstall one"
                )
            found[arch.model_type] = arch
    known = features()
    for arch in found.values():
        unknown = [f for f in arch.features if f not in known]
        if unknown:
            raise PorterError(
                f"{arch.__module__}.{arch.__qualname__}: features {', '.join(map(repr, unknown))} are neither in "
                "porter's list (porter.features.FEATURES) nor declared by a plugin (hook porter_features)")
    return dict(sorted(found.items()))


def features() -> dict[str, str]:
    """Every feature name architectures may state: porter's list, then the plugins' additions."""
    from porter.features import FEATURES

    merged: dict[str, str] = {}
    for answer in manager().hook.porter_features():
        merged.update(answer or {})
    merged.update(FEATURES)
    return merged


def is_builtin(arch: type) -> bool:
    """Whether an architecture is one of porter's own (a module of porter's ``plugins/``)."""
    module = sys.modules.get(arch.__module__)
    path = getattr(module, "__file__", None)
    return path is not None and Path(path).resolve().is_relative_to(BUILTIN_DIR)


def builtin_architectures() -> dict[str, type]:
    """porter's own architectures (what its generated/, README table and property tests cover)."""
    return {t: cls for t, cls in architectures().items() if is_builtin(cls)}


def package_of(arch: type) -> str:
    """The top-level package (or module) that provides an architecture class."""
    return arch.__module__.split(".")[0]


def plugin_of(arch: type) -> str:
    """The distribution/module name that provided an architecture class."""
    return sys.modules[arch.__module__].__name__


def architecture_for(info) -> type:
    """The architecture class that ports a model, by model_type or by a plugin's claim."""
    archs = architectures()
    if info.model_type in archs:
        return archs[info.model_type]
    claimed = manager().hook.porter_claim(info=info)
    if claimed is not None:
        return claimed
    known = ", ".join(archs)
    raise UnsupportedArchitecture(
        f"no porter plugin ports model_type {info.model_type!r} (architectures: "
        f"{', '.join(info.architectures) or '?'}). Ported types: {known}. "
        "`porter port CHECKPOINT` ports it through the traced path (torch.export) or reports the ops "
        "it lacks; or install a plugin that provides it."
    )


class _BuiltinHooks:
    """Defaults every architecture gets: its ``space`` attribute answers porter_config_space,
    its ``edit_graph`` method porter_edit_graph."""

    @hookimpl
    def porter_config_space(self, model_type):
        cls = architectures().get(model_type)
        return cls.config_space() if cls is not None else None

    @hookimpl
    def porter_edit_graph(self, arch, graph):
        arch.edit_graph(graph)


def config_space(model_type: str) -> dict:
    """The merged configuration space (field -> hypothesis strategy) plugins declare for a model_type."""
    merged: dict = {}
    for answer in reversed(manager().hook.porter_config_space(model_type=model_type)):
        if answer:
            merged.update(answer)
    return merged


def edit_graph(arch, graph) -> None:
    """Run every porter_edit_graph implementation on ``graph`` (the architecture's own
    ``edit_graph`` first), validating after each one so a broken edit names its plugin."""
    import json

    pm = manager()
    for impl in reversed(pm.hook.porter_edit_graph.get_hookimpls()):  # pluggy's call order
        builtin = impl.plugin_name == "porter.builtin"
        who = f"{type(arch).__qualname__}.edit_graph" if builtin else f"plugin {impl.plugin_name}"
        before = json.dumps([graph.graph, graph.outputs, graph.constants])
        impl.function(**{k: v for k, v in {"arch": arch, "graph": graph}.items() if k in impl.argnames})
        if json.dumps([graph.graph, graph.outputs, graph.constants]) != before:
            graph.validate(f"after the graph edit of {who}")
            graph.edited_by.append(f"{type(arch).__module__}.{type(arch).__qualname__}.edit_graph" if builtin
                                   else impl.plugin_name)


# -- transformers classes that plugins define themselves ------------------------------------------

_AUTO = {"config": "AutoConfig", "causal_lm": "AutoModelForCausalLM", "model": "AutoModel"}
_registered: dict[str, set[str]] = {}  # model_type -> keys registered with transformers


def _load_class(arch: type, key: str):
    ref = arch.transformers_classes[key]
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PorterError(f"{arch.__module__}.{arch.__qualname__}.transformers_classes[{key!r}] = {ref!r} "
                          f"cannot be loaded ({type(exc).__name__}: {exc}); write 'package.module:ClassName'") from None


def register_transformers_classes(models: bool = True) -> None:
    """Register the transformers classes plugins define themselves (``Architecture.transformers_classes``)
    with transformers' Auto classes: configs always, model classes (which import torch) with
    ``models``. porter calls this before it asks transformers about a model; it is idempotent."""
    for model_type, arch in architectures().items():
        classes = getattr(arch, "transformers_classes", None) or {}
        if not classes:
            continue
        unknown = set(classes) - set(_AUTO)
        if unknown or "config" not in classes:
            raise PorterError(f"{arch.__module__}.{arch.__qualname__}.transformers_classes needs a 'config' entry "
                              f"and knows only {', '.join(_AUTO)} (got {', '.join(sorted(classes))})")
        done = _registered.setdefault(model_type, set())
        wanted = [k for k in ("config", "causal_lm", "model") if k in classes and (models or k == "config")]
        if all(k in done for k in wanted):
            continue
        import transformers

        config_cls = _load_class(arch, "config")
        for key in wanted:
            if key in done:
                continue
            auto = getattr(transformers, _AUTO[key])
            if key == "config":
                auto.register(model_type, config_cls, exist_ok=True)
            else:
                auto.register(config_cls, _load_class(arch, key), exist_ok=True)
            done.add(key)
