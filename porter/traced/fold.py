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
    # layers of different kinds (dense/MoE, attention/other) share one body: the union of their
    # nodes, each switched on (``when``) in the layers that have it
    ops_by_name: dict = {}
    by_layer = [_rename_conflicts({x[0]: x for x in sig}, sig, ops_by_name) for sig in sigs]
    sigs = [list(d.values()) for d in by_layer]
    union = _union_order([[x[0] for x in sig] for sig in sigs])
    present = {name: [i for i in range(n_layer) if name in by_layer[i]] for name in union}
    # the carried value: the same node pattern of every layer
    results = {pattern(c) for c in carries[1:] if c is not None}
    if len(results) != 1:
        raise NotFoldable("no single carried value")
    result = results.pop()
    if len(present.get(result, [])) != n_layer:
        raise NotFoldable("the carried value is not computed in every layer")
    # layer 0: the input in the carry's place, which becomes $carry there too
    init = None
    for name, sig1 in by_layer[1].items():
        sig0 = by_layer[0].get(name)
        for k, src in enumerate(sig1[2]):
            if src == "$carry":
                if sig0 is None or k >= len(sig0[2]):
                    raise NotFoldable("layer 0 does not read the carry where layer 1 does")
                cand = sig0[2][k]
                if init is None:
                    init = cand
                elif init != cand:
                    raise NotFoldable("layer 0 reads two values in the carry's place")
                sig0[2][k] = "$carry"
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
    masks: dict[tuple, str] = {}
    body = []
    for name in union:
        layers_on = present[name]
        first = by_layer[layers_on[0]][name]
        _, op, ins, attrs, hf = first
        for i in layers_on:
            if len(by_layer[i][name][2]) != len(ins):
                raise NotFoldable(f"{name} has a different number of inputs in layer {i}")

        def per_layer(get):
            return [get(by_layer[i][name]) if i in layers_on else get(first) for i in range(n_layer)]

        new_ins = []
        for k in range(len(ins)):
            values = per_layer(lambda x, k=k: x[2][k])
            if len({values[i] for i in layers_on}) == 1:
                new_ins.append(values[layers_on[0]])
            else:
                key = _hp_name(name, f"in{k}")
                hparams[key] = values
                new_ins.append(f"${key}[L]")
        new_attrs = {}
        keys = list(dict.fromkeys(a for i in layers_on for a in by_layer[i][name][3]))
        for a in keys:
            values = per_layer(lambda x, a=a: x[3].get(a))
            if any(values[i] is None for i in layers_on):
                raise NotFoldable(f"attribute {a} of {name} only in some layers")
            if all(values[i] == values[layers_on[0]] for i in layers_on):
                new_attrs[a] = values[layers_on[0]]
            else:
                if any(isinstance(v, list) for v in values):
                    raise NotFoldable(f"list attribute {a} of {name} differs between layers")
                if any(isinstance(v, str) and v.startswith("$") for v in values):
                    raise NotFoldable(f"attribute {a} of {name} is an expression that differs between layers")
                key = _hp_name(name, a)
                hparams[key] = values
                new_attrs[a] = f"${key}[L]"
        d = {"name": name, "op": op, "inputs": new_ins, "attrs": new_attrs}
        hfs = {by_layer[i][name][4] for i in layers_on}
        if len(hfs) == 1 and hf:
            d["hf"] = hf
        if len(layers_on) != n_layer:
            on = tuple(i in layers_on for i in range(n_layer))
            if on not in masks:
                masks[on] = f"layer_kind_{len(masks)}"
                hparams[masks[on]] = list(on)
            d["when"] = f"${masks[on]}[L]"
        body.append(d)
    patterns = {f"{container}.{{L}}." + w[m.end():] for w in lowered.weights if (m := weight_re.match(w))}
    _check_order(body, pre_names | set(lowered.inputs) | set(lowered.constants) | set(lowered.weights) | patterns)
    # per-layer weights: the same shape in every layer that has them
    layered: dict = {}
    for wname, shape in lowered.weights.items():
        m = weight_re.match(wname)
        if m:
            p = f"{container}.{{L}}." + wname[m.end():]
            if p in layered and layered[p][0] != shape:
                raise NotFoldable(f"{p} differs in shape between layers")
            layered.setdefault(p, (shape, []))[1].append(int(m.group(1)))
    layered = {p: (shape, None if sorted(ls) == list(range(n_layer)) else sorted(ls)) for p, (shape, ls) in layered.items()}
    graph = [_node_dict(n) for n in pre]
    graph.append({"repeat": "n_layer", "init": init, "result": result, "body": body})
    graph.extend(post_items)
    return graph, hparams, layered


def _rename_conflicts(d: dict, sig: list, table: dict) -> dict:
    """Node names that mean a different op in another layer kind get the op as a suffix
    (``table``: name -> op of the first layer that has it, shared by the whole fold)."""
    renames = {}
    for name, op, *_ in sig:
        seen = table.setdefault(name, op)
        if seen != op:
            renames[name] = f"{name[:-4]}~{op}-{{L}}" if name.endswith("-{L}") else f"{name}~{op}"
    if not renames:
        return d
    out = {}
    for name, op, ins, attrs, hf in sig:
        new = renames.get(name, name)
        out[new] = (new, op, [renames.get(x, x) for x in ins], attrs, hf)
    return out


def _union_order(orders: list[list[str]]) -> list[str]:
    """One order of every layer kind's node names that keeps each kind's own order."""
    union: list[str] = []
    for order in orders:
        pos = -1
        for name in order:
            if name in union:
                at = union.index(name)
                if at < pos:
                    raise NotFoldable("layer kinds order their common nodes differently")
                pos = at
            else:
                union.insert(pos + 1, name)
                pos += 1
    return union


def _check_order(body: list[dict], outside: set) -> None:
    """Every input of a body node is computed before it (or comes from outside the loop)."""
    defined = {"$carry"}
    for d in body:
        for src in d["inputs"]:
            if src.startswith("$") and src != "$carry":
                continue  # per-layer choice; its candidates are body nodes checked by name below
            if src not in defined and src not in outside:
                raise NotFoldable(f"{d['name']} reads {src} before it is computed")
        defined.add(d["name"])


def _hp_name(node: str, what: str) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]+", "_", node.replace("-{L}", "")).strip("_")
    return f"layer_{base}_{what}"
