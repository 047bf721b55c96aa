"""porter-highway: a porter plugin package, written as an outside author would write one.

It defines a model type of its own, ``highway`` (a transformers config and model, registered
with the Auto classes through its Architecture's ``transformers_classes``), and ports it with
porter's extension points only:

- ``templates/blocks.j2``: the macro ``highway_mlp``, put in porter's ``mlp`` slot by a knob;
- ``Highway.edit_graph``: LayerScale on the attention output, inserted into the rendered graph;
- ``generated/highway.json``: its rendered spec (``porter generate --package porter_highway``);
- ``tests/``: its own hypothesis parity suite against transformers.

Importing this package imports neither transformers nor torch (porter loads every plugin at start
up, ``porter convert`` without torch included).
"""
