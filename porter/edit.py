"""Graph edits: what a plugin changes in its rendered graph after the templates and before porter
checks the graph's weights against the checkpoint (hook ``porter_edit_graph``, or an
Architecture's ``edit_graph`` method).

Nodes are the rendered dicts (``{"name", "op", "inputs", "attrs", "hf"?, "when"?}``); nodes of the
layer loop are named with ``{L}`` (``"attn_out-{L}"``). A typical edit inserts a node after
another and points the old node's readers at it::

    def edit_graph(self, g):
        g.insert_after("attn_out-{L}", "attn_ls-{L}", "mul", ["attn_out-{L}", "blk.{L}.attn_scale.weight"],
                       rewire=True)

After each plugin's edit the graph is validated (ops, attributes, references, names) and a
problem is reported as a :class:`porter.errors.SpecError` that names the plugin.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from porter.errors import SpecError


class GraphEdit:
    """The rendered graph of one architecture, with helpers to change it.

    ``knobs`` and ``hparams`` are the architecture's; an edit may add hparams that its nodes
    refer to as ``"$name"``.
    """

    def __init__(self, rendered: dict, knobs: dict[str, Any], hparams: dict[str, Any]):
        self.graph: list[dict] = rendered["graph"]
        self.outputs: list[str] = rendered["outputs"]
        self._rendered_outputs = list(self.outputs)  # the names the runtime reads: they stay
        self.knobs = knobs
        self.hparams = hparams
        self.constants: dict[str, dict] = {}  # name -> weight declaration carrying its values
        self.edited_by: list[str] = []  # who changed the graph (stamped into the spec's produced_by)

    # -- looking -----------------------------------------------------------------------------------
    def _lists(self) -> Iterator[list]:
        yield self.graph
        for item in self.graph:
            if "repeat" in item:
                yield item["body"]

    def _nodes(self) -> Iterator[dict]:
        for nodes in self._lists():
            for n in nodes:
                if "repeat" not in n:
                    yield n

    @property
    def loop(self) -> dict | None:
        """The layer loop (``{"repeat", "init", "result", "body"}``), or None."""
        return next((item for item in self.graph if "repeat" in item), None)

    def _find(self, name: str) -> tuple[list, int]:
        for nodes in self._lists():
            for i, n in enumerate(nodes):
                if n.get("name") == name:
                    return nodes, i
        close = [n["name"] for n in self._nodes() if n["name"].split("-")[0] == name.split("-")[0]]
        hint = f" (nodes with that stem: {', '.join(close)})" if close else \
            " (nodes of the layer loop are named with {L}, e.g. 'attn_out-{L}')"
        raise SpecError(f"graph edit: no node named {name!r}{hint}")

    def __contains__(self, name: str) -> bool:
        return any(n["name"] == name for n in self._nodes())

    def node(self, name: str) -> dict:
        """The node named ``name`` (a dict: change it in place, or use :meth:`replace`)."""
        nodes, i = self._find(name)
        return nodes[i]

    def names(self) -> list[str]:
        """Every node name, in graph order (the loop body where the loop stands)."""
        out = []
        for item in self.graph:
            out.extend(n["name"] for n in item["body"]) if "repeat" in item else out.append(item["name"])
        return out

    def readers(self, name: str) -> list[dict]:
        """The nodes that take ``name`` as an input."""
        return [n for n in self._nodes() if name in n["inputs"]]

    # -- editing -----------------------------------------------------------------------------------
    @staticmethod
    def _new(name: str, op: str, inputs: list[str], attrs: dict | None, hf: str | None, when: str | None) -> dict:
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(i, str) for i in inputs):
            raise SpecError(f"graph edit: inputs of {name!r} must be a list of names, got {inputs!r}")
        node = {"name": name, "op": op, "inputs": list(inputs), "attrs": dict(attrs or {})}
        if hf:
            node["hf"] = hf
        if when:
            node["when"] = when
        return node

    def insert_after(self, after: str, name: str, op: str, inputs: list[str], attrs: dict | None = None, *,
                     hf: str | None = None, when: str | None = None, rewire: bool = False) -> dict:
        """Add a node right after node ``after`` (in the same place: top level or layer loop).
        With ``rewire``, every reader of ``after`` reads the new node instead (see :meth:`rewire`)."""
        if name in self:
            raise SpecError(f"graph edit: a node named {name!r} exists already")
        nodes, i = self._find(after)
        node = self._new(name, op, inputs, attrs, hf, when)
        nodes.insert(i + 1, node)
        if rewire:
            self.rewire(after, name)
        return node

    def replace(self, name: str, op: str | None = None, inputs: list[str] | None = None,
                attrs: dict | None = None, **fields) -> dict:
        """Change a node's op, inputs or attributes (or ``hf``/``when``) keeping its name, so its
        readers are unchanged. A new op with no new ``attrs`` starts with none."""
        node = self.node(name)
        if op is not None and op != node["op"] and attrs is None:
            attrs = {}
        new = self._new(name, op or node["op"], node["inputs"] if inputs is None else inputs,
                        node["attrs"] if attrs is None else attrs, fields.get("hf", node.get("hf")),
                        fields.get("when", node.get("when")))
        unknown = set(fields) - {"hf", "when"}
        if unknown:
            raise SpecError(f"graph edit: replace() sets op, inputs, attrs, hf or when, not {sorted(unknown)}")
        node.clear()
        node.update(new)
        return node

    def rewire(self, old: str, new: str, *, skip: tuple[str, ...] = ()) -> int:
        """Every reader of ``old`` reads ``new`` instead: node inputs and the loop's ``init`` and
        ``result``; not ``new`` itself nor the nodes named in ``skip``. Returns how many references
        changed. The graph's outputs keep their names (the runtime reads ``result_output`` or
        ``result_embd``): to put a node after an output, :meth:`rename` the output first."""
        changed = 0
        for n in self._nodes():
            if n["name"] == new or n["name"] in skip:
                continue
            for j, src in enumerate(n["inputs"]):
                if src == old:
                    n["inputs"][j] = new
                    changed += 1
        loop = self.loop
        if loop is not None:
            for key in ("init", "result"):
                if loop[key] == old:
                    loop[key] = new
                    changed += 1
        return changed

    def rename(self, old: str, new: str) -> dict:
        """Give node ``old`` the name ``new`` and point its readers at it. An output renamed this
        way leaves its name free for the node that takes its place::

            g.rename("result_output", "logits_raw2")
            g.insert_after("logits_raw2", "result_output", "scale", ["logits_raw2"], {"s": 0.5})
        """
        if new in self:
            raise SpecError(f"graph edit: a node named {new!r} exists already")
        node = self.node(old)
        node["name"] = new
        self.rewire(old, new)
        return node

    def remove(self, name: str) -> dict:
        """Remove a node nothing reads any more (rewire its readers first)."""
        readers = [n["name"] for n in self.readers(name)]
        loop = self.loop
        if readers or name in self.outputs or (loop and name in (loop["init"], loop["result"])):
            raise SpecError(f"graph edit: cannot remove {name!r}: it is still read by {', '.join(readers) or 'the graph'}")
        nodes, i = self._find(name)
        return nodes.pop(i)

    def constant(self, name: str, values, shape: list[int] | None = None) -> None:
        """Declare a constant F32 weight carried in the spec itself (not in the GGUF, not in the
        checkpoint), ``shape`` in numpy order (default: 1-D). Nodes read it by ``name``."""
        data = np.asarray(values, dtype=np.float64).reshape(-1)
        shape = [int(data.size)] if shape is None else [int(d) for d in shape]
        if math.prod(shape) != data.size:
            raise SpecError(f"graph edit: constant {name!r} has {data.size} values, shape {shape} needs {math.prod(shape)}")
        if not np.isfinite(data).all():
            raise SpecError(f"graph edit: constant {name!r} holds NaN or Inf")
        if "{L}" in name:
            raise SpecError(f"graph edit: constant {name!r}: constants are not per layer (no {{L}})")
        self.constants[name] = {"name": name, "shape": shape, "data": [float(x) for x in data]}

    # -- checking ----------------------------------------------------------------------------------
    def validate(self, where: str = "after the graph edits") -> None:
        """Check ops, attributes, references and names as the spec will be checked (weights
        named with a '.' are taken as given here; the checkpoint check follows)."""
        from pydantic import ValidationError

        from porter.spec import INPUT_KINDS, SPEC_VERSION, Spec, check

        if self.outputs != self._rendered_outputs:
            raise SpecError(f"{where}: the graph's outputs must stay {self._rendered_outputs} (the runtime reads "
                            f"them by name), got {self.outputs}; rename a node to put it in an output's place")
        nodes = set(self.names())
        used = {src for n in self._nodes() for src in n["inputs"]}
        weights = [{"name": w, "shape": [1], "layered": "{L}" in w} for w in sorted(used - nodes)
                   if "." in w and w not in self.constants]
        weights += list(self.constants.values())
        try:
            check(Spec(version=SPEC_VERSION, architecture="edit", hparams=self.hparams,
                       inputs=[{"name": i, "kind": i} for i in INPUT_KINDS if i in used],
                       weights=weights, graph=self.graph, outputs=self.outputs))
        except SpecError as exc:
            raise SpecError(f"{where}: {exc}") from None
        except ValidationError as exc:
            raise SpecError(f"{where}: a node is malformed: {exc}") from None
