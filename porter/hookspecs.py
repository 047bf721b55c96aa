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


@hookspec
def porter_templates():
    """Return ``{namespace: folder}``: Jinja templates (block macros, layouts) this plugin adds.

    A template ``blocks.j2`` in the folder is then named ``"<namespace>/blocks.j2"``: by an
    Architecture's ``template`` (a layout of its own) or by a ``blocks`` knob (a macro of its
    own in one of porter's slots, ``{"mlp": "<namespace>/blocks.j2:my_mlp"}``). Templates of any
    namespace can import porter's own as ``"blocks.j2"`` or ``"porter/blocks.j2"``. The namespace
    ``porter`` is porter's; two plugins claiming one namespace for different folders is an error.
    """


@hookspec
def porter_edit_graph(arch, graph):
    """Edit the rendered graph of ``arch`` (an :class:`porter.arch.Architecture` instance) in place.

    ``graph`` is a :class:`porter.edit.GraphEdit`: the rendered nodes with helpers to find,
    insert after, replace, rewire, rename and remove nodes and to declare constant weights (the
    graph's outputs keep their names). It runs after the
    templates render and before porter checks the graph's weights against the checkpoint; the
    graph is validated after each implementation, and an invalid result is reported with the
    plugin's name. Return nothing. Every implementation runs; check ``isinstance(arch, ...)`` to
    edit only your own architectures. (``Architecture.edit_graph`` is the same thing for one class
    and its subclasses: porter calls it through this hook, before other plugins' implementations.)
    """


@hookspec
def porter_features():
    """Return ``{name: one-line description}``: names an Architecture's ``features`` may use
    beyond porter's own list (:data:`porter.features.FEATURES`). A feature no plugin declares
    is rejected when the architectures load."""
