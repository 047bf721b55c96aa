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

from porter.traced.values import ggml_shape, spec_size



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
                   tables={k: v for k, v in lowered.tables.items() if k in used},
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

    sigs, carries = [], []
    for i, body in enumerate(layers):
        local = {n.name for n in body}
        carry_src = set()
        sig = []
        for n in body:
            ins = []
            for src in n.inputs:
                if src in local:
                    ins.append(_layer_pattern(src))
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
            attrs = {k: v for k, v in n.attrs.items() if not (n.op in ("kv_store", "state_store", "delta_net", "ssm_scan") and k == "layer")}
            hf = n.hf
            if hf:
                hf = re.sub(rf"^{re.escape(container)}\.{i}(\.|$)", rf"{container}.{{L}}\1", hf)
            sig.append((_layer_pattern(n.name), n.op, ins, attrs, hf))
        if i == 0:
            # layer 0's carry is whatever it reads from before the loop in the carry's place
            carry_src = set()
        if len(carry_src) > 1:
            raise NotFoldable(f"layer {i} reads {len(carry_src)} values of layer {i - 1}")
        carries.append(next(iter(carry_src), None))
        sigs.append(sig)
    # what each layer hands on: what the next layer reads of it; for the last, what follows the loop
    last_read = {src for n in post for src in n.inputs if layer_of.get(src) == n_layer - 1}
    if len(last_read) != 1:
        raise NotFoldable(f"the loop's output is {len(last_read)} values of the last layer")
    results_raw = [carries[i + 1] for i in range(n_layer - 1)] + [last_read.pop()]
    if any(r is None for r in results_raw):
        raise NotFoldable("a layer does not read the previous one")
    # layers of different kinds (dense/MoE, attention/other) share one body: the union of their
    # nodes, each switched on (``when``) in the layers that have it. Nodes of the same name are
    # one node (their inputs chosen per layer) unless that orders the kinds inconsistently; then
    # only nodes computing the same thing from the same nodes are shared.
    for strict in (False, True):
        try:
            return _assemble(strict, sigs, layers, results_raw, pre, post, layer_of, pre_names, lowered,
                             container, weight_re)
        except NotFoldable:
            if strict:
                raise


def _assemble(strict, sigs, layers, results_raw, pre, post, layer_of, pre_names, lowered, container, weight_re):
    """The loop from the layers' signatures; ``strict`` shares only nodes computing the same thing."""
    n_layer = len(sigs)
    sigs = [[(name, op, list(ins), attrs, hf) for name, op, ins, attrs, hf in sig] for sig in sigs]
    if strict:
        by_layer, renames = _strict_kinds(sigs)
    else:
        ops_by_name: dict = {}
        by_layer = [_rename_conflicts({x[0]: x for x in sig}, sig, ops_by_name) for sig in sigs]
        renames = [{} for _ in sigs]
    for _ in range(64):
        try:
            union = _union_order(by_layer)
            break
        except _Cycle as cyc:
            if strict or not _break_cycle(by_layer, cyc.nodes):
                raise
            renames = [{} for _ in sigs]  # the carried values keep their names (fixed below)
    else:
        raise NotFoldable("too many name clashes between layer kinds")
    results = [renames[i].get(_layer_pattern(r), _layer_pattern(r)) for i, r in enumerate(results_raw)]
    present = {name: [i for i in range(n_layer) if name in by_layer[i]] for name in union}
    # layer 0: the input in the carry's place (where layer 1 reads $carry), which becomes $carry there too
    init = None
    for name, sig1 in by_layer[1].items():
        sig0 = by_layer[0].get(name)
        for k, src in enumerate(sig1[2]):
            if src == "$carry":
                if sig0 is None or k >= len(sig0[2]):
                    raise NotFoldable(f"layer 0 does not read the carry where layer 1 does ({name})")
                cand = sig0[2][k]
                if init is None:
                    init = cand
                elif init != cand:
                    raise NotFoldable("layer 0 reads two values in the carry's place")
    if init is None:
        raise NotFoldable("no carry")
    for sig0 in by_layer[0].values():
        sig0[2][:] = ["$carry" if src == init else src for src in sig0[2]]
    if len(set(results)) == 1:
        result = results[0]
    else:
        # kinds end in different nodes: one common view of them carries on
        shape = next(n.shape for n in layers[0] if n.name == results_raw[0])
        union.append("layer.result-{L}")
        present["layer.result-{L}"] = list(range(n_layer))
        for i in range(n_layer):
            by_layer[i]["layer.result-{L}"] = ("layer.result-{L}", "reshape", [results[i]],
                                               {"shape": [spec_size(d) for d in ggml_shape(shape)]}, None)
        result = "layer.result-{L}"
    last_result = results_raw[-1]
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
                if any(isinstance(v, str) and "$" in v or isinstance(v, list) and any(isinstance(x, str) for x in v)
                       for v in values):
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


_LAYER_SUFFIX = re.compile(r"-(\d+)$")


def _layer_pattern(name: str) -> str:
    """A layer node's name with its layer index as ``{L}``."""
    return _LAYER_SUFFIX.sub("-{L}", name)


def _strict_kinds(sigs: list) -> tuple[list[dict], list[dict]]:
    """Share a node between layers only if it has the same op and reads the same body nodes;
    otherwise each layer kind gets its own copy (``name~kind``). Returns per layer the nodes and
    the renames applied."""
    kinds: dict = {}
    ref: dict = {}
    out, renames = [], []
    for sig in sigs:
        kind = kinds.setdefault(tuple((x[0], x[1]) for x in sig), len(kinds))
        local = {x[0] for x in sig}
        ren: dict = {}
        d: dict = {}
        for name, op, ins, attrs, hf in sig:
            ins2 = [ren.get(x, x) for x in ins]
            key = (op, tuple(x if x in ren.values() or x in local else "*" for x in ins2))
            seen = ref.setdefault(name, key)
            new = name
            if seen != key:
                new = name[:-4] + f"~{kind}-{{L}}" if name.endswith("-{L}") else f"{name}~{kind}"
                ref.setdefault(new, key)
            ren[name] = new
            d[new] = (new, op, ins2, attrs, hf)
        out.append(d)
        renames.append(ren)
    return out, renames


def _rename_conflicts(d: dict, sig: list, table: dict) -> dict:
    """Node names that mean another op, or the same op with attributes of another form (a shape
    of another rank, another size expression), in another layer kind get a suffix (``table``: name -> the kinds of node seen under it, first
    first, shared by the whole fold)."""
    renames = {}
    for name, op, _ins, attrs, _hf in sig:
        key = (op, _attr_form(attrs))
        kinds = table.setdefault(name, [key])
        if key not in kinds:
            kinds.append(key)
        if key != kinds[0]:
            same_op = [k for k in kinds if k[0] == op]
            tag = op if kinds[0][0] != op and same_op[0] == key else f"{op}{same_op.index(key)}"
            renames[name] = f"{name[:-4]}~{tag}-{{L}}" if name.endswith("-{L}") else f"{name}~{tag}"
    if not renames:
        return d
    out = {}
    for name, op, ins, attrs, hf in sig:
        new = renames.get(name, name)
        out[new] = (new, op, [renames.get(x, x) for x in ins], attrs, hf)
    return out


def _attr_form(attrs: dict):
    """What must agree for two layers' nodes to be one node: the attributes with numbers left
    out (numbers may become per-layer lists; expressions and list lengths may not)."""
    def form(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return "#"
        if isinstance(v, (list, tuple)):
            return tuple(form(x) for x in v)
        return repr(v)
    return tuple(sorted((k, form(v)) for k, v in attrs.items() if k != "layer"))


def _union_order(by_layer: list[dict]) -> list[str]:
    """One order of every layer kind's nodes in which each node comes after all its inputs, in
    every kind (a topological sort of the union; ties keep the first kind's order)."""
    rank: dict[str, tuple] = {}
    deps: dict[str, set] = {}
    for li, sigs in enumerate(by_layer):
        for pos, (name, _op, ins, _a, _h) in enumerate(sigs.values()):
            rank.setdefault(name, (li, pos))
            deps.setdefault(name, set()).update(i for i in ins if i in sigs)
    ready = sorted((n for n in rank if not deps[n]), key=rank.get)
    done: list[str] = []
    placed: set[str] = set()
    waiting = {n: set(d) for n, d in deps.items() if d}
    while ready:
        n = ready.pop(0)
        done.append(n)
        placed.add(n)
        freed = [m for m, d in waiting.items() if n in d and d - placed == set()]
        for m in freed:
            del waiting[m]
        ready = sorted(set(ready) | set(freed), key=rank.get)
    if waiting:
        raise _Cycle(_a_cycle({n: d - placed for n, d in waiting.items()}))
    return done


class _Cycle(NotFoldable):
    def __init__(self, nodes: list):
        super().__init__(f"layer kinds depend on their common nodes in opposite orders: {nodes}")
        self.nodes = nodes


def _break_cycle(by_layer: list[dict], nodes: list) -> bool:
    """Give the cycle's nodes their own name in the layers where they read other inputs than in
    the first layer that has them (two kinds' counters that shifted: ``reshape#10`` is before
    the cache in one kind and after it in another). False when nothing could be renamed."""
    changed = False
    for name in set(nodes):
        first = next((d[name] for d in by_layer if name in d), None)
        for i, d in enumerate(by_layer):
            sig = d.get(name)
            if sig is None or sig is first or sig[2] == first[2]:
                continue
            new = name[:-4] + f"~{i}-{{L}}" if name.endswith("-{L}") else f"{name}~{i}"
            items = {}
            for k, (n, op, ins, attrs, hf) in d.items():
                items[new if n == name else n] = (new if n == name else n, op, [new if x == name else x for x in ins],
                                                   attrs, hf)
            d.clear()
            d.update(items)
            changed = True
    return changed


def _a_cycle(deps: dict) -> list:
    """One dependency cycle among ``deps`` (node -> nodes it needs), for the error message."""
    for start in deps:
        path, seen = [start], {start}
        while True:
            nxt = next((d for d in sorted(deps.get(path[-1], ())) if d in deps), None)
            if nxt is None:
                break
            if nxt in seen:
                return path[path.index(nxt):] + [nxt]
            path.append(nxt)
            seen.add(nxt)
    return sorted(deps)[:6]


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
