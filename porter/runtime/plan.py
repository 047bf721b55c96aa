"""A graph spec unrolled once per model, so that building a graph for a new shape is one pass
over prepared steps.

Every prompt length needs a graph of its own; walking the spec for each one (formatting layer
names, evaluating hyperparameter references, looking names up) cost more Python than the ggml
calls themselves. :class:`GraphPlan` does that work once: each step knows its node's concrete
name and inputs, whether it is switched on in its layer, and its attributes, of which only those
that mention a runtime size (``$n_tokens``, ``$n_kv``, ``$n_out``) are evaluated per build.

The plan also finds where the graph may select its output rows early (:func:`early_rows`), which
gated activations run as one kernel (:func:`fuse_swiglu`) and, for a model's own weights, which
products of one input run as one (:mod:`porter.runtime.fusion`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from porter.errors import SpecError
from porter.spec import Node, Repeat, Spec, expr

SYMBOLS = frozenset({"n_tokens", "n_kv", "n_out"})  # runtime sizes: known per build, not per model

# ops whose output row t (ne[1]) depends only on input row t, for [features, tokens] operands
_ROW_WISE_UNARY = {"silu", "gelu_erf", "gelu_tanh", "relu", "relu2", "sigmoid", "tanh", "exp", "sqr", "sqrt",
                   "neg", "abs", "log", "recip", "softplus", "gelu_quick", "elu", "step", "expm1", "floor",
                   "ceil", "round", "trunc", "cos", "sin", "rms_norm", "norm", "l2_norm", "scale", "softcap",
                   "clamp"}
_ROW_WISE_BINARY = {"add", "sub", "mul", "div"}


class Step:
    """One node of the unrolled graph: ``on`` is True, False (switched off in this layer: its
    first input passes through) or the ``when`` text when that depends on a runtime size;
    ``attrs`` holds the evaluated attributes, ``dynamic`` those evaluated per build."""

    __slots__ = ("attrs", "dynamic", "glu", "in_glu", "inputs", "label", "layer", "name", "on", "op", "part",
                 "select")

    def __init__(self, name: str, op: str, layer: int | None, inputs: tuple, on, attrs: dict, dynamic: dict):
        self.name, self.op, self.layer, self.inputs = name, op, layer, inputs
        self.label = name.encode()[:63]  # ggml keeps 63 bytes of a name
        self.on, self.attrs, self.dynamic = on, attrs, dynamic
        self.select: tuple[int, ...] = ()  # inputs whose output rows are selected here (early rows)
        self.glu: tuple[Step, int] | None = None  # a mul: the silu step fused into it, at that input
        self.in_glu = False  # a silu computed inside the mul that reads it
        self.part = None  # a mul_mat computed inside a stacked product: (FusedMatmul, first row)


class GraphPlan:
    """The unrolled steps of ``spec`` (layer loop instantiated), checked for early output rows
    against the model's ``weights``; with ``stack_matmuls`` (``weights`` are the model's loaded
    tensors) products of one input whose weights are neighbours in memory are marked to run as one
    (``fused``; :meth:`close` frees their headers)."""

    def __init__(self, spec: Spec, weights: dict[str, Any], stack_matmuls: bool = False):
        self.spec = spec
        self.values = dict(spec.hparams)
        self.steps: list[Step] = []
        carry = None
        for item in spec.graph:
            if isinstance(item, Repeat):
                carry = self._source(item.init, None, None)
                for layer in range(int(self.values[item.repeat])):
                    for node in item.body:
                        self.steps.append(self._step(node, layer, carry))
                    carry = item.result.format(L=layer)
            else:
                self.steps.append(self._step(item, None, carry))
        self.rows, self.glus, self.fused = None, 0, None
        if len({s.name for s in self.steps}) == len(self.steps):  # the rewrites find steps by name
            readers = _readers(self.steps, spec)
            self.rows = early_rows(self.steps, spec, weights, readers)
            self.glus = fuse_swiglu(self.steps, readers)
            if stack_matmuls:
                from porter.runtime.fusion import FusedWeights

                self.fused = FusedWeights(self.steps, weights, readers)

    def close(self) -> None:
        if self.fused is not None:
            self.fused.close()

    def value(self, v: Any, layer: int | None, values: dict | None = None) -> Any:
        """A spec value with its references resolved (``values``: hyperparameters and sizes)."""
        if isinstance(v, list):
            return [self.value(x, layer, values) for x in v]
        if expr.is_reference(v):
            table = self.values if values is None else values
            return expr.evaluate(v, lambda name, per_layer: _lookup(table, v, name, per_layer, layer))
        return v

    def _source(self, name: str, layer: int | None, carry: str | None) -> str | None:
        if name == "$carry":
            return carry
        if name.startswith("$"):
            name = self.value(name, layer)
        if layer is not None and "{L}" in name:
            name = name.format(L=layer)
        return name

    def _step(self, node: Node, layer: int | None, carry: str | None) -> Step:
        name = node.name.format(L=layer) if layer is not None else node.name
        inputs = tuple(self._source(s, layer, carry) for s in node.inputs)
        on: Any = True
        if node.when is not None:
            on = node.when if _mentions_size(node.when) else bool(self.value(node.when, layer))
        attrs, dynamic = {}, {}
        if on is not False:  # a switched-off node's attributes are never read
            for k, v in node.attrs.items():
                if _mentions_size(v):
                    dynamic[k] = v
                else:
                    attrs[k] = self.value(v, layer)
        return Step(name, node.op, layer, inputs, on, attrs, dynamic)


def _lookup(values: dict, text: str, name: str, per_layer: bool, layer: int | None) -> Any:
    if name not in values:
        raise SpecError(f"unknown reference {text!r}")
    out = values[name]
    if per_layer:
        if layer is None or not isinstance(out, list) or not 0 <= layer < len(out):
            raise SpecError(f"{text!r}: no per-layer value for layer {layer}")
        return out[layer]
    return out


def _mentions_size(v: Any) -> bool:
    if isinstance(v, list):
        return any(_mentions_size(x) for x in v)
    return expr.is_reference(v) and any(name in SYMBOLS for name, _ in expr.references(v))


class EarlyRows:
    """Where the output rows are selected early: ``root`` is the step that selects them (it
    becomes a pass-through), ``out_ids`` the input holding the row indices."""

    def __init__(self, root: str, out_ids: str):
        self.root, self.out_ids = root, out_ids


def _readers(steps: list[Step], spec: Spec) -> dict[str, set[str]]:
    """Name -> the steps that read it (a spec output is also read from outside); a switched-off
    step reads only its first input."""
    readers: dict[str, set[str]] = defaultdict(set)
    for s in steps:
        for src in (s.inputs if s.on is not False else s.inputs[:1]):
            readers[src].add(s.name)
    for name in spec.outputs:
        readers[name].add("\0output")
    return readers


def early_rows(steps: list[Step], spec: Spec, weights: dict, readers: dict[str, set[str]]) -> EarlyRows | None:
    """Move the selection of the rows whose logits are read (``get_rows(x, out_ids)``) back over
    every step that treats each token on its own, as llama.cpp does by hand in each model's last
    layer: with a prompt, the last layer's attention output projection, feed-forward block and
    residual adds then run on the output rows only.

    A step joins when its op is row-wise, its other operands are weights, and everything that
    reads it has joined; its inputs from outside get a ``get_rows`` (``Step.select``). Returns
    None when nothing can move (no such selection, or it reads a step that is not row-wise).
    The builder checks the moved selections' shapes ([features, tokens]) and builds the graph
    as written if one does not fit."""
    out_ids = {d.name for d in spec.inputs if d.kind == "out_ids"}
    if not out_ids:
        return None
    roots = [s for s in steps if s.op == "get_rows" and s.on is True and len(s.inputs) == 2 and s.inputs[1] in out_ids]
    if len(roots) != 1:
        return None
    root = roots[0]
    graph_inputs = {d.name for d in spec.inputs} | {"kv_slots"}
    joined = {root.name}
    rows_of: dict[str, tuple[int, ...]] = {}
    for s in reversed(steps[:steps.index(root)]):
        who = readers.get(s.name)
        if not who or not who <= joined:
            continue
        token = _token_inputs(s, weights, graph_inputs)
        if token is None:
            continue
        joined.add(s.name)
        rows_of[s.name] = token
    if root.inputs[0] not in joined:
        return None
    for s in steps:
        token = rows_of.get(s.name)
        if token:
            s.select = tuple(i for i in token if s.inputs[i] not in joined)
    return EarlyRows(root.name, root.inputs[1])


def _token_inputs(s: Step, weights: dict, graph_inputs: set[str]) -> tuple[int, ...] | None:
    """The inputs of a row-wise step that carry tokens (its others are weights), or None when
    the step is not row-wise."""
    if s.on is False:  # a pass-through of its first input
        return None if s.inputs[0] in weights else (0,)
    if s.on is not True or any(src is None or src in graph_inputs for src in s.inputs):
        return None
    if s.op == "mul_mat":
        return (1,) if len(s.inputs) == 2 and s.inputs[0] in weights else None
    if s.op in _ROW_WISE_BINARY:
        token = tuple(i for i, src in enumerate(s.inputs) if src not in weights)
        return token or None
    if s.op in _ROW_WISE_UNARY and len(s.inputs) == 1 and s.inputs[0] not in weights:
        return (0,)
    return None


def fuse_swiglu(steps: list[Step], readers: dict[str, set[str]]) -> int:
    """Mark each ``mul(silu(a), b)`` whose silu nothing else reads: the builder computes it in
    one kernel (``Ops.swiglu``, ggml's GLU, as llama.cpp's gated MLPs do), one node less per
    layer and bit for bit the same values. Returns how many pairs were marked."""
    by_name = {s.name: s for s in steps}
    count = 0
    for s in steps:
        if s.op != "mul" or s.on is not True or len(s.inputs) != 2:
            continue
        for i, src in enumerate(s.inputs):
            act = by_name.get(src)
            if (act is not None and act.op == "silu" and act.on is True and readers.get(src) == {s.name}
                    and s.inputs[1 - i] != src and i not in s.select and not act.in_glu):
                s.glu, act.in_glu = (act, i), True
                count += 1
                break
    return count
