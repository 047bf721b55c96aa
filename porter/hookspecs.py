"""Every hook porter calls. Each function is empty; its docstring is the contract.

Plugins (built-in ones in ``plugins/`` and third-party ones alike) are modules registered under
the ``porter`` entry-point group, implementing some of these hooks with ``@porter.plugins.hookimpl``.
A hook implementation whose name matches no spec here is rejected when porter starts.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("porter")


@hookspec
def porter_architectures():
    """Return a list of :class:`porter.arch.Architecture` subclasses this plugin provides.

    Each class names the transformers ``model_type`` it ports (unique across plugins), its
    family, the llama.cpp architecture name used in GGUF files, its tensor renaming table, and
    the knobs it sets on the shared block templates.
    """


@hookspec(firstresult=True)
def porter_claim(info):
    """Claim a model that no architecture names by ``model_type``.

    ``info`` is a :class:`porter.introspect.ModelInfo`. Return an Architecture subclass able to
    port it (for example by recognising class names or parameter names), or ``None`` for
    "not mine". The first non-None answer wins.
    """


@hookspec
def porter_config_space(model_type):
    """Return the configuration space of ``model_type`` for parity properties, or ``None``.

    The answer is a dict mapping transformers config field names to the values to draw from
    (a list, or a hypothesis strategy); fields not mentioned keep the tiny defaults of
    ``Architecture.tiny_config``, and the shared shape space (sizes, heads, layers, vocabulary,
    tied embeddings, rope theta) is drawn by porter. porter answers for every Architecture from
    its ``space`` attribute; a plugin answers only to add to the space of its own model types.
    """
