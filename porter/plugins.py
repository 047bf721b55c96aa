"""The plugin manager: loads architecture plugins from the ``porter`` entry-point group."""

from __future__ import annotations

import functools
import sys

import pluggy

from porter import hookspecs
from porter.errors import PorterError, UnsupportedArchitecture

hookimpl = pluggy.HookimplMarker("porter")
ENTRY_POINT_GROUP = "porter"


@functools.lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("porter")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.register(_BuiltinHooks(), name="porter.builtin")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PorterError(f"a porter plugin implements a hook that does not exist: {exc}") from None
    return pm


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
    return dict(sorted(found.items()))


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
    """Defaults every architecture gets: its ``space`` attribute answers porter_config_space."""

    @hookimpl
    def porter_config_space(self, model_type):
        cls = architectures().get(model_type)
        return cls.config_space() if cls is not None else None


def config_space(model_type: str) -> dict:
    """The merged configuration space (field -> hypothesis strategy) plugins declare for a model_type."""
    merged: dict = {}
    for answer in reversed(manager().hook.porter_config_space(model_type=model_type)):
        if answer:
            merged.update(answer)
    return merged
