"""From the flat list of lowered nodes to the spec's graph: dead nodes removed, layers folded.

Layers whose nodes are the same up to the layer index become the spec's layer loop (``repeat``):
node names and per-layer weights get ``{L}``, the value one layer hands the next is the loop's
carry. Where layers differ only in attribute values or in which graph input they read (a
sliding-window layer's mask, a local layer's rope base), the differing values become per-layer
hparam lists (``"$name[L]"``). Layers that differ in structure (or hand each other more than one
value) are written out one after another, which the runtime executes the same way.
"""

from __future__ import annotations

import re
from dataclasses import replace



def prune(lowered):
    """Drop nodes nothing live needs (patterns leave the literal lowering of what they
    absorbed behind). Roots: the logits and every node parity compares (``hf``)."""
    by_name = {n.name: n for n in lowered.nodes}
    live = set()
    stack = [lowered.output] + [n.name for n in lowered.nodes if n.hf]
    while stack:
        name = stack.pop()
        if name in live or name not in by_name:
            continue
        live.add(name)
        stack.extend(by_name[name].inputs)
    nodes = [n for n in lowered.nodes if n.name in live]
    used = {i for n in nodes for i in n.inputs}
    return replace(lowered, nodes=nodes,
                   weights={k: v for k, v in lowered.weights.items() if k in used},
                   constants={k: v for k, v in lowered.constants.items() if k in used},
                   inputs={k: v for k, v in lowered.inputs.items() if k in used or k == "tokens"})


class NotFoldable(Exception):
    pass


def fold(lowered, container: str | None):
    """(graph items, extra hparams, layered weight patterns) for the spec; flat when the layers
    cannot share one loop body."""
    n_layer = lowered.n_layer
    if container is None or n_layer < 2:
        return _flat(lowered), {}, {}
    try:
        return _fold(lowered, container, n_layer)
    except NotFoldable:
        return _flat(lowered), {}, {}


def _flat(lowered):
    return [_node_dict(n) for n in lowered.nodes]


def _node_dict(n, name=None, inputs=None, attrs=None, hf=None) -> dict:
    d = {"name": name or n.name, "op": n.op, "inputs": list(inputs if inputs is not None else n.inputs),
         "attrs": dict(attrs if attrs is not None else n.attrs)}
    h = hf if hf is not None else n.hf
    if h:
        d["hf"] = h
    return d


def _fold(lowered, container: str, n_layer: int):
    nodes = lowered.nodes
    layer_of = {n.name: n.layer for n in nodes}
    layers = [[n for n in nodes if n.layer == i] for i in range(n_layer)]
    if any(not body for body in layers):
        raise NotFoldable("a layer without nodes")
    others = [n for n in nodes if n.layer is None]
    # a node outside the layers comes after the loop if it depends on a layer node
    after: set[str] = set()
    for n in others:
        if any(layer_of.get(i) is not None or i in after for i in n.inputs):
            after.add(n.name)
    pre = [n for n in others if n.name not in after]
    post = [n for n in others if n.name in after]
    pre_names = {n.name for n in pre}

    weight_re = re.compile(rf"^{re.escape(container)}\.(\d+)\.")

    def weight_pattern(name: str, layer: int) -> str | None:
        m = weight_re.match(name)
        if not m:
            return None
        if int(m.group(1)) != layer:
            raise NotFoldable(f"layer {layer} uses {name}")
        return f"{container}.{{L}}." + name[m.end():]

    suffix = re.compile(r"-(\d+)$")

    def pattern(name: str) -> str:
        return suffix.sub("-{L}", name)

    sigs, carries = [], []
    for i, body in enumerate(layers):
        local = {n.name for n in body}
        carry_src = set()
        sig = []
        for n in body:
            ins = []
            for src in n.inputs:
                if src in local:
                    ins.append(pattern(src))
                elif layer_of.get(src) is not None:
                    if layer_of[src] != i - 1:
                        raise NotFoldable(f"layer {i} reads layer {layer_of[src]}")
                    carry_src.add(src)
                    ins.append("$carry")
                elif src in pre_names or src in lowered.inputs or src in lowered.constants:
                    ins.append(src)
                elif src in lowered.weights:
                    p = weight_pattern(src, i)
                    ins.append(p if p is not None else src)
                else:
                    ins.append(src)
            attrs = {k: v for k, v in n.attrs.items() if not (n.op == "kv_store" and k == "layer")}
            hf = n.hf
            if hf:
                hf = re.sub(rf"^{re.escape(container)}\.{i}(\.|$)", rf"{container}.{{L}}\1", hf)
            sig.append((pattern(n.name), n.op, ins, attrs, hf))
        if i == 0:
            # layer 0's carry is whatever it reads from before the loop in the carry's place
            carry_src = set()
        if len(carry_src) > 1:
            raise NotFoldable(f"layer {i} reads {len(carry_src)} values of layer {i - 1}")
        carries.append(next(iter(carry_src), None))
        sigs.append(sig)
    # the structure (names, ops, number of inputs) must agree across layers
    ref = sigs[0]
    for sig in sigs[1:]:
        if len(sig) != len(ref) or any(a[0] != b[0] or a[1] != b[1] or len(a[2]) != len(b[2]) for a, b in zip(sig, ref)):
            raise NotFoldable("layers differ in structure")
    # the carried value: the same node pattern of every layer
    results = {pattern(c) for c in carries[1:] if c is not None}
    if len(results) != 1:
        raise NotFoldable("no single carried value")
    result = results.pop()
    # layer 0: the input in the carry's place, which becomes $carry there too
    init = None
    for j, node_sig in enumerate(sigs[1]):
        for k, src in enumerate(node_sig[2]):
            if src == "$carry":
                cand = sigs[0][j][2][k]
                if init is None:
                    init = cand
                elif init != cand:
                    raise NotFoldable("layer 0 reads two values in the carry's place")
                sigs[0][j][2][k] = "$carry"
    if init is None:
        raise NotFoldable("no carry")
    last_result = result.replace("{L}", str(n_layer - 1))
    # after the loop, only the last layer's carried value may be read ($carry)
    post_items = []
    for n in post:
        ins = []
        for src in n.inputs:
            if layer_of.get(src) is not None:
                if src != last_result:
                    raise NotFoldable(f"{n.name} reads {src} from inside the loop")
                ins.append("$carry")
            else:
                ins.append(src)
        post_items.append(_node_dict(n, inputs=ins))
    # values that differ between layers become per-layer hparam lists
    hparams: dict = {}
    body = []
    for j, node_sig in enumerate(ref):
        name, op, ins, attrs, hf = node_sig
        new_ins = []
        for k in range(len(ins)):
            values = [sigs[i][j][2][k] for i in range(n_layer)]
            if len(set(values)) == 1:
                new_ins.append(values[0])
            else:
                key = _hp_name(name, f"in{k}")
                hparams[key] = values
                new_ins.append(f"${key}[L]")
        new_attrs = {}
        keys = list(dict.fromkeys(a for i in range(n_layer) for a in sigs[i][j][3]))
        for a in keys:
            values = [sigs[i][j][3].get(a) for i in range(n_layer)]
            if any(v is None for v in values):
                raise NotFoldable(f"attribute {a} of {name} only in some layers")
            if all(v == values[0] for v in values):
                new_attrs[a] = values[0]
            else:
                key = _hp_name(name, a)
                if any(isinstance(v, list) for v in values):
                    raise NotFoldable(f"list attribute {a} of {name} differs between layers")
                if any(isinstance(v, str) and v.startswith("$") for v in values):
                    raise NotFoldable(f"attribute {a} of {name} is an expression that differs between layers")
                hparams[key] = values
                new_attrs[a] = f"${key}[L]"
        hfs = {sigs[i][j][4] for i in range(n_layer)}
        d = {"name": name, "op": op, "inputs": new_ins, "attrs": new_attrs}
        if len(hfs) == 1 and hf:
            d["hf"] = hf
        body.append(d)
    # per-layer weights must have the same shape in every layer
    layered = {}
    for wname, shape in lowered.weights.items():
        m = weight_re.match(wname)
        if m:
            p = f"{container}.{{L}}." + wname[m.end():]
            if p in layered and layered[p] != shape:
                raise NotFoldable(f"{p} differs in shape between layers")
            layered[p] = shape
    for p in layered:
        for i in range(n_layer):
            if p.format(L=i) not in lowered.weights:
                raise NotFoldable(f"{p} is missing in layer {i}")
    graph = [_node_dict(n) for n in pre]
    graph.append({"repeat": "n_layer", "init": init, "result": result, "body": body})
    graph.extend(post_items)
    return graph, hparams, layered


def _hp_name(node: str, what: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", node.replace("-{L}", "")).strip("_")
    return f"layer_{base}_{what}"
