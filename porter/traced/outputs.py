"""The ends of a traced graph: the logits rows porter computes, and the module outputs parity
compares."""

from __future__ import annotations

from porter.traced.values import O, T, Gap, Val

# ops that treat every token (row) on its own: selecting rows before them gives the same rows
_ROW_WISE = {"mul_mat", "rms_norm", "norm", "l2_norm", "scale", "softcap", "clamp", "cont", "silu", "gelu_erf",
             "gelu_tanh", "relu", "sigmoid", "tanh", "exp", "sqr", "sqrt", "neg", "abs", "log", "recip",
             "softplus", "gelu_quick", "elu", "add", "sub", "mul", "div"}


def select_output_rows(lw, logits: Val) -> str:
    """Insert ``get_rows(x, out_ids)`` as early as possible on the path to the logits (the final
    norm and the output projection then run only on the rows whose logits are read), and name
    the logits ``result_output``. Returns that name."""
    logits = lw.contiguous(logits)
    if logits.shape[-2] != T:
        raise Gap("output", f"logits of shape {list(logits.shape)} (expected [batch, tokens, vocab])")
    nodes = lw.nodes
    by_name = {n.name: n for n in nodes}
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    weights = set(lw.weights) | set(lw.constants)
    chain = []
    cur = by_name[logits.tensor]
    while True:
        data = _token_input(cur, weights)
        if cur.op not in _ROW_WISE or data is None or cur.layer is not None:
            break
        chain.append((cur, data))
        src = by_name.get(cur.inputs[data])
        if src is None or src.layer is not None or consumers.get(src.name, 0) != 1 or src.op not in _ROW_WISE:
            break
        cur = src
    if chain:
        first, idx = chain[-1]
        src_name = first.inputs[idx]
        src = by_name.get(src_name)
        src_shape = src.shape if src is not None else ()
        rows = _rows_shape(src_shape)
        pos = nodes.index(first)
        lw._cur = None
        lw.inputs["out_ids"] = "out_ids"
        sel = lw.emit("get_rows", [src_name, "out_ids"], shape=rows, role="out_rows")
        node = lw.nodes.pop()
        node.name = "result_rows"
        nodes.insert(pos, node)
        first.inputs[idx] = "result_rows"
        for n, _ in chain:
            n.attrs = _tokens_to_out(n.attrs)
            n.shape = tuple(O if d == T else d for d in n.shape)
        del sel
        final = logits.tensor
    else:
        lw.inputs["out_ids"] = "out_ids"
        flat = lw.reshape(logits, (logits.shape[-2], logits.shape[-1]))
        sel = lw.emit("get_rows", [flat, "out_ids"], shape=(O, logits.shape[-1]), role="out_rows")
        final = sel.tensor
    _rename(nodes, final, "result_output")
    return "result_output"


def _token_input(node, weights) -> int | None:
    """Which input of a row-wise node carries the tokens (the others are weights)."""
    if node.op == "mul_mat":
        return 1 if node.inputs[0] in weights else None
    if node.op in ("add", "sub", "mul", "div"):
        a, b = node.inputs
        if b in weights:
            return 0
        if a in weights and node.op in ("add", "mul"):
            return 1
        return None
    return 0


def _rows_shape(shape) -> tuple:
    dims = [d for d in shape if d != 1]
    return (O,) + tuple(d for d in dims if d != T)


def _tokens_to_out(attrs: dict) -> dict:
    def swap(v):
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, str) and "$n_tokens" in v:
            return v.replace("$n_tokens", "$n_out")
        return v

    return {k: swap(v) for k, v in attrs.items()}


def _rename(nodes, old: str, new: str) -> None:
    for n in nodes:
        if n.name == old:
            n.name = new
        n.inputs = [new if i == old else i for i in n.inputs]


def module_outputs(graph, deps) -> dict:
    """module path -> the fx node its forward returns, for modules with exactly one escaping
    token-dependent value. Whole models (``PreTrainedModel`` subclasses, which return output
    dataclasses rather than a tensor) are left out."""
    from porter.traced.lower import _clean_path

    members: dict = {}
    classes: dict = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            path = _clean_path(path)
            if not path or path.startswith("_empty"):
                continue
            members.setdefault(path, []).append(node)
            classes[path] = cls
    out = {}
    for path, nodes in members.items():
        if _is_whole_model(classes.get(path)):
            continue
        inside = {n.name for n in nodes}
        escaping = [n for n in nodes if deps.get(n.name) == "data"
                    and any(u.op == "output" or u.name not in inside for u in n.users)]
        if len(escaping) == 1:
            out[path] = escaping[0]
    return out


def _is_whole_model(cls) -> bool:
    try:
        from transformers import PreTrainedModel

        return isinstance(cls, type) and issubclass(cls, PreTrainedModel)
    except Exception:  # noqa: BLE001 - a class name string: judge by the name
        return isinstance(cls, str) and cls.endswith(("Model", "ForCausalLM"))
