"""Lowering an exported ATen graph to porter graph-spec nodes.

The graph is walked in order. Every node depending on the token ids (the *data* path) or only on
weights is lowered through :mod:`porter.traced.aten`, the table with one entry per ATen op, and
:mod:`porter.traced.patterns`, the rewrites where ggml has a fused op (norms, rotary embeddings,
attention with the KV cache, grouped-query broadcasting). Nodes that depend on neither (masks,
position ids, rotary tables: the *aux* path) are computed on the example input by
:mod:`porter.traced.aux` and replaced by porter's runtime inputs.

A node that cannot be lowered becomes a :class:`~porter.traced.values.GapVal`; it is an op gap
only if a live output needs it (patterns often consume the nodes around a literal gap). Every
emitted node is named after the transformers module it comes from, ``<module>.<op>-<layer>``
inside a layer, so parity can compare it and the layers can become the spec's loop
(:mod:`porter.traced.fold`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.utils._sympy.functions import Min as TorchMin

from porter.traced.values import O, RUNTIME, T, Gap, GapVal, Val, ggml_axes, ggml_shape, numel, spec_size

F32 = torch.float32


@dataclass
class LayerInfo:
    container: str | None  # module path of the layer list, e.g. "model.layers"
    count: int

    _PATH = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)(?:\.(?P<rest>.*))?$")

    @classmethod
    def find(cls, graph, config) -> LayerInfo:
        seen: dict[str, set[int]] = {}
        for node in graph.nodes:
            path = module_path(node)
            m = cls._PATH.match(path) if path else None
            if m:
                seen.setdefault(m.group("prefix"), set()).add(int(m.group("idx")))
        if not seen:
            return cls(None, 0)
        want = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        best = max(seen, key=lambda p: (len(seen[p]) == want, len(seen[p]), -len(p)))
        return cls(best, max(seen[best]) + 1)

    def split(self, path: str) -> tuple[int | None, str]:
        """(layer index, path inside the layer) of a module path; (None, path) outside the layers."""
        if self.container and (path == self.container or path.startswith(self.container + ".")):
            rest = path[len(self.container) + 1:]
            idx, _, inner = rest.partition(".")
            if idx.isdigit():
                return int(idx), inner
        return None, path


def module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_empty") or path == "L['self']" else _clean_path(path)


def module_class(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1].rstrip("'>")


def _clean_path(path: str) -> str:
    # torch.export writes some paths as L['self'].model.layers[0]...; normalise to dotted names
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def target_name(node) -> str:
    t = node.target
    if hasattr(t, "_overloadpacket") or hasattr(t, "name") and callable(getattr(t, "name", None)):
        return str(t)
    return getattr(t, "__name__", str(t))


@dataclass
class Emitted:
    name: str
    op: str
    inputs: list
    attrs: dict
    layer: int | None
    path: str
    fx: str | None
    shape: tuple = ()
    hf: str | None = None


@dataclass
class Lowered:
    """The flat result of lowering, before the layer loop is found."""

    nodes: list[Emitted]
    inputs: dict[str, str]  # input name -> kind
    weights: dict[str, list]  # weight name -> shape (numpy order)
    constants: dict[str, list]  # inline constant name -> (shape, values)
    hparams: dict[str, Any]
    output: str
    causal: bool
    n_layer: int
    kv_widths: dict[str, list[int]]  # cache name (k, v, k1, v1...) -> width per layer
    state_widths: dict[str, list[int]] = field(default_factory=dict)  # recurrent state -> elements per layer
    tables: dict = field(default_factory=dict)  # computed constants the GGUF carries (name -> array)
    hf_outputs: dict[str, str] = field(default_factory=dict)  # spec node -> transformers module
    gaps: list[Gap] = field(default_factory=list)


class Lowering:
    def __init__(self, trace):
        from porter.traced.aux import AuxAnalysis

        self.trace = trace
        self.program = trace.program
        self.graph = trace.program.graph
        self.layers = LayerInfo.find(self.graph, trace.config)
        self.n_layer = max(self.layers.count, 1)
        self.nodes: list[Emitted] = []
        self.vals: dict[str, Val | GapVal] = {}
        self.inputs: dict[str, str] = {}
        self.weights: dict[str, list] = {}
        self.constants: dict[str, tuple] = {}
        self.tables: dict = {}  # big computed constants written into the GGUF (name -> numpy array)
        self.hparams: dict[str, Any] = {}
        self.kv_width = {"k": [0] * self.n_layer, "v": [0] * self.n_layer}
        self.state_width: dict[str, list[int]] = {}  # recurrent state name -> F32 elements per layer
        self.causal: bool | None = None
        self._names: Counter = Counter()
        self._cur = None  # the fx node being lowered (names the emitted nodes)
        self._cache: dict[tuple, Val] = {}  # memoized materializations (permute views...)
        self._by_name: dict[str, Emitted] = {}
        self.deps = self._classify()
        self._kinds_of_path = self._ambiguous_paths()
        self.aux = AuxAnalysis(self)
        self.gaps: list[Gap] = []

    def _ambiguous_paths(self) -> set[str]:
        """Module paths inside a layer that hold different module classes in different layers."""
        classes: dict[str, set] = {}
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            layer, inner = self.layers.split(module_path(node))
            if layer is not None and inner:
                classes.setdefault(inner, set()).add(module_class(node))
        return {p for p, c in classes.items() if len(c) > 1}

    # -- dependency classes ------------------------------------------------------------------
    def _classify(self) -> dict[str, str]:
        """data (depends on the token ids' values) | weight (on parameters only) | aux (neither)."""
        sig = self.program.graph_signature
        kinds = {s.arg.name: s.kind.name for s in sig.input_specs}
        out: dict[str, str] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                k = kinds.get(node.name)
                out[node.name] = {"USER_INPUT": "data", "PARAMETER": "weight"}.get(k, "aux")
            elif node.op == "call_function":
                if target_name(node) in ("aten.sym_size.int", "sym_size") or node.target is torch.ops.aten.sym_size.int:
                    out[node.name] = "aux"
                    continue
                classes = {out.get(a.name, "aux") for a in node.all_input_nodes}
                out[node.name] = "data" if "data" in classes else "weight" if "weight" in classes else "aux"
        return out

    # -- values ------------------------------------------------------------------------------
    def val(self, x) -> Any:
        """The lowered value of an fx argument (a Val for tensors, python values otherwise)."""
        import torch.fx

        if isinstance(x, torch.fx.Node):
            v = self.vals.get(x.name)
            if v is None:
                if self.deps.get(x.name) == "aux" or x.op == "call_function" and x.name not in self.vals:
                    v = self.aux.value(x)
                    self.vals[x.name] = v
                else:
                    raise Gap(target_name(x), "value not lowered", x)
            if isinstance(v, GapVal):
                raise v.gap
            return v
        if isinstance(x, (list, tuple)):
            return type(x)(self.val(a) for a in x)
        return x

    def size(self, x):
        """A size argument (int, SymInt or an fx node computing one) as an int or expression."""
        import torch.fx

        if isinstance(x, torch.fx.Node):
            v = x.meta.get("val")
            if v is None:
                raise Gap(target_name(x), "size without a value", x)
            return self.sym(v)
        if isinstance(x, torch.SymInt):
            return self.sym(x)
        return int(x)

    def sym(self, v):
        """A torch SymInt (or int) in porter's runtime symbols (the sequence length is n_tokens)."""
        if isinstance(v, int):
            return v
        if isinstance(v, torch.SymInt):
            e = v.node.expr
        else:
            e = v
        subs = {s: T for s in e.free_symbols if s in self.trace.seq_symbols}
        e = e.subs(subs)
        limit = self.trace.max_tokens
        if limit is not None and e.has(sympy.Min, TorchMin):
            # the graph holds for at most `limit` tokens (the GGUF's context length): min(c, T) is T for c >= limit
            e = e.replace(lambda x: isinstance(x, (sympy.Min, TorchMin)) and T in x.args and all(
                a == T or (a.is_Integer and int(a) >= limit) for a in x.args), lambda x: T)
        if e.free_symbols - set(RUNTIME):
            raise Gap("shape", f"size {e} depends on something other than the sequence length")
        return int(e) if e.is_Integer else e

    def meta_shape(self, node) -> tuple:
        v = node.meta.get("val")
        if v is None or not hasattr(v, "shape"):
            raise Gap(target_name(node), "no tensor value recorded", node)
        return tuple(self.sym(d) for d in v.shape)

    def meta_dtype(self, node):
        v = node.meta.get("val")
        return getattr(v, "dtype", F32)

    # -- emission ----------------------------------------------------------------------------
    def emit(self, op: str, inputs: list, attrs: dict | None = None, *, shape, dtype=F32, kind: str | None = None,
             dense: bool = True, role: str | None = None) -> Val:
        names = [self.tensor(i) if isinstance(i, Val) else i for i in inputs]
        node = self._cur
        path = module_path(node) if node is not None else ""
        layer, inner = self.layers.split(path)
        where = inner or ("layer" if layer is not None else path or "top")
        if layer is not None and inner in self._kinds_of_path:
            # the same module path holds different module classes in different layers (a dense MLP
            # here, a mixture of experts there): the class keeps their nodes apart
            where = f"{inner}<{module_class(node)}>"
        base = f"{where}.{role or op}"
        key = (layer, base)
        k = self._names[key]
        self._names[key] += 1
        name = base + (f"#{k}" if k else "") + (f"-{layer}" if layer is not None else "")
        clean = {a: _attr(v) for a, v in (attrs or {}).items()}
        emitted = Emitted(name, op, names, clean, layer, path, node.name if node is not None else None, tuple(shape))
        self.nodes.append(emitted)
        self._by_name[name] = emitted
        if kind is None:
            kind = "weight" if all(isinstance(i, Val) and i.kind == "weight" for i in inputs if isinstance(i, Val)) \
                and any(isinstance(i, Val) for i in inputs) else "data"
        return Val(name, tuple(shape), dtype, kind=kind, dense=dense)

    def input(self, name: str, kind: str, shape, dtype) -> Val:
        self.inputs[name] = kind
        return Val(name, tuple(shape), dtype, kind="data")

    def weight(self, name: str, shape, dtype=F32) -> Val:
        self.weights[name] = [int(d) for d in shape]
        return Val(name, tuple(int(d) for d in shape), dtype, kind="weight")

    def constant(self, values: torch.Tensor, hint: str, big: bool = False) -> Val:
        """An F32 constant computed at trace time: carried in the spec itself, or with ``big`` as
        a GGUF tensor of its own (``porter.table.*``)."""
        values = values.detach().to(torch.float32).contiguous()
        key = ("const", hint, tuple(values.shape), values.numpy().tobytes())
        if key in self._cache:
            return self._cache[key]
        if big:
            name = f"porter.table.{len(self.tables)}"
            self.tables[name] = values.numpy()
            self.weights[name] = list(values.shape)
        else:
            name = f"const.{hint}.{len(self.constants)}"
            self.constants[name] = (list(values.shape), [float(x) for x in values.reshape(-1).tolist()])
        v = Val(name, tuple(values.shape), F32, kind="weight")
        self._cache[key] = v
        return v

    # -- materializing lazy values -----------------------------------------------------------
    def tensor(self, v: Val) -> str:
        """The spec tensor name of a value, emitting the view/copy nodes its lazy parts need."""
        if v.scalar is not None and v.tensor is None:
            raise Gap("scalar", "a constant number where a tensor is needed")
        if v.heads is not None:
            v = self._materialize_heads(v)
        if v.expand is not None:
            v = self._materialize_expand(v)
        if v.perm is not None:
            key = ("perm", v.tensor, v.perm)
            hit = self._cache.get(key)
            if hit is None:
                hit = self.emit("permute", [v.tensor], {"axes": list(v.perm)}, shape=v.shape, kind=v.kind, role="permute")
                hit.dense = False
                self._cache[key] = hit
            return hit.tensor
        return v.tensor

    def plain(self, v: Val) -> Val:
        """``v`` with its lazy parts materialized (perm stays: a view)."""
        if v.heads is not None:
            v = self._materialize_heads(v)
        if v.expand is not None:
            v = self._materialize_expand(v)
        return v

    def contiguous(self, v: Val) -> Val:
        """A value whose tensor is one contiguous block in ggml's reversed layout."""
        v = self.plain(v)
        if v.perm is None and v.dense:
            return v
        key = ("cont", v.tensor, v.perm)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.emit("cont", [v], shape=v.shape, dtype=v.dtype, kind=v.kind)
            self._cache[key] = hit
        return hit

    def rows(self, v: Val) -> Val:
        """A value whose innermost dimension is contiguous (what ggml's elementwise kernels read)."""
        v = self.plain(v)
        if v.perm is not None and v.perm[0] != 0:
            return self.contiguous(v)
        return v

    def _materialize_expand(self, v: Val) -> Val:
        src = self.plain(v.expand)
        src = self.rows(src)
        shape = v.shape
        if len(src.shape) < len(shape):
            src = self.reshape(src, (1,) * (len(shape) - len(src.shape)) + tuple(src.shape))
        return self.emit("repeat", [src], {"shape": [spec_size(d) for d in ggml_shape(shape)]}, shape=shape,
                         dtype=src.dtype, kind=src.kind)

    def _materialize_heads(self, v: Val) -> Val:
        src, dim, rep = v.heads
        src = self.contiguous(src)
        s = list(src.shape)
        # repeat_interleave along dim: [.., h, ..] -> [.., h, 1, ..] -> [.., h, rep, ..] -> [.., h*rep, ..]
        unsq = s[:dim + 1] + [1] + s[dim + 1:]
        grown = s[:dim + 1] + [rep] + s[dim + 1:]
        x = self.reshape(src, tuple(unsq))
        x = self.emit("repeat", [x], {"shape": [spec_size(d) for d in ggml_shape(grown)]}, shape=grown,
                      dtype=src.dtype, kind=src.kind)
        return self.reshape(x, tuple(v.shape))

    # -- layout helpers ----------------------------------------------------------------------
    def reshape(self, v: Val, shape) -> Val:
        shape = tuple(shape)
        if shape == tuple(v.shape):
            return v
        v = self.contiguous(v)
        if ggml_shape(shape) == ggml_shape(v.shape):
            return v.with_(shape=shape)
        src = self._by_name.get(v.tensor)
        if src is not None and src.op == "reshape" and v.perm is None:
            v = Val(src.inputs[0], v.shape, v.dtype, kind=v.kind)  # a reshape of a reshape is one reshape
            if ggml_shape(shape) == list(self._ggml_ne(src.inputs[0])):
                return Val(src.inputs[0], shape, v.dtype, kind=v.kind)
        return self.emit("reshape", [v], {"shape": [spec_size(d) for d in ggml_shape(shape)]}, shape=shape,
                         dtype=v.dtype, kind=v.kind)

    def _ggml_ne(self, name: str) -> list:
        node = self._by_name.get(name)
        if node is not None:
            return ggml_shape(node.shape)
        if name in self.weights:
            return ggml_shape(self.weights[name])
        return []

    def permute(self, v: Val, dims) -> Val:
        """torch ``permute(v, dims)`` as a lazy ggml permute (composed with a pending one)."""
        dims = [d % v.rank for d in dims]
        if dims == list(range(v.rank)):
            return v
        out_shape = tuple(v.shape[d] for d in dims)
        if v.meta.get("experts") is not None and dims[0] == 0:  # experts' weights picked per row
            w, ids = v.meta["experts"]
            return Val(None, out_shape, v.dtype, meta={"experts": (self.permute(w, dims), ids)})
        if v.heads is not None:  # permute what is repeated; the repeated dim moves along
            src, hdim, rep = v.heads
            return Val(None, out_shape, v.dtype, kind=v.kind, heads=(self.permute(src, dims), dims.index(hdim), rep))
        if v.expand is not None and v.expand.rank == v.rank:
            return Val(None, out_shape, v.dtype, kind=v.kind, expand=self.permute(v.expand, dims))
        v = self.plain(v)
        out_shape = tuple(v.shape[d] for d in dims)
        ax_in, ax_out = ggml_axes(v.shape), ggml_axes(out_shape)
        if any(a is None for a in ax_in) or any(a is None for a in ax_out):
            # size-one dimensions were dropped to fit 4-D: go through a copy
            return self.reshape(self.contiguous(v), out_shape) if all(
                v.shape[d] == 1 for d in range(v.rank) if d != dims[d]) else self._permute_dropped(v, dims)
        # ggml permute: source axis a moves to position axes[a]
        step = [0, 1, 2, 3]
        for i, d in enumerate(dims):
            step[ax_in[d]] = ax_out[i]
        base = v.perm or (0, 1, 2, 3)
        composed = [step[base[a]] for a in range(4)]
        perm = None if composed == [0, 1, 2, 3] else tuple(composed)
        if perm is not None and v.dense and self._only_moves_ones(v, perm):
            # the data order is unchanged (only size-one axes move): a reshape view, no copy
            return self.reshape(Val(v.tensor, self._base_shape(v), v.dtype, kind=v.kind), out_shape)
        return Val(v.tensor, out_shape, v.dtype, kind=v.kind, perm=perm, dense=v.dense)

    def _base_shape(self, v: Val) -> tuple:
        """torch shape of the tensor under a value's pending permute."""
        if v.perm is None:
            return tuple(v.shape)
        ne = ggml_shape(v.shape) + [1] * (4 - len(ggml_shape(v.shape)))
        base = [ne[v.perm[a]] for a in range(4)]
        n = 4
        while n > 1 and base[n - 1] == 1:
            n -= 1
        return tuple(reversed(base[:n]))

    def _only_moves_ones(self, v: Val, perm) -> bool:
        """Whether permuting the base tensor by ``perm`` keeps its non-one axes in order."""
        base_ne = list(reversed(self._base_shape(v))) + [1] * 4
        moved = sorted((perm[a], a) for a in range(4) if base_ne[a] != 1)
        order = [a for _, a in moved]
        return order == sorted(order)

    def _permute_dropped(self, v: Val, dims) -> Val:
        raise Gap("permute", f"permute {dims} of a {v.rank}-D tensor {list(v.shape)} does not fit ggml's 4 dimensions")

    def axis(self, v: Val, dim: int) -> int:
        a = ggml_axes(v.shape)[dim % v.rank]
        if a is None:
            raise Gap("dim", f"dimension {dim} of {list(v.shape)} is not a ggml axis")
        return a

    def broadcast_shape(self, a, b) -> tuple:
        sa, sb = list(a), list(b)
        n = max(len(sa), len(sb))
        sa, sb = [1] * (n - len(sa)) + sa, [1] * (n - len(sb)) + sb
        out = []
        for x, y in zip(sa, sb):
            if x == 1:
                out.append(y)
            elif y == 1 or x == y:
                out.append(x)
            else:
                raise Gap("broadcast", f"shapes {list(a)} and {list(b)} do not broadcast")
        return tuple(out)

    # -- the walk ----------------------------------------------------------------------------
    def window_of(self, traced: int) -> int:
        """The real sliding window for a window seen in a traced mask (a real configuration is
        traced with a small stand-in window: see :func:`porter.traced.port.trace_config`)."""
        shift = getattr(self.trace, "window_shift", None)
        return int(traced) if shift is None else int(shift[0] + traced - shift[1])

    def run(self) -> Lowered:
        from porter.traced import aten  # noqa: F401 - registers the table
        from porter.traced.table import TABLE

        output_node = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "call_function":
                if self.deps[node.name] == "aux":
                    continue
                self._cur = node
                handler = TABLE.get(target_name(node))
                try:
                    if handler is None:
                        raise Gap(target_name(node), "no lowering rule for this ATen op", node)
                    v = handler(self, node)
                except Gap as gap:
                    if gap.node is None:
                        gap.node = node
                    v = GapVal(gap)
                self.vals[node.name] = v
                self._cur = None
            elif node.op == "output":
                output_node = node
        return self._finish(output_node)

    def _placeholder(self, node) -> None:
        sig = self.program.graph_signature
        kind = self.deps[node.name]
        if node.name in self.trace.parameters:
            name = self.trace.parameters[node.name]
            name = self.trace.aliases.get(name, name)
            shape = [int(d) for d in node.meta["val"].shape]
            self.vals[node.name] = self.weight(name, shape, node.meta["val"].dtype)
        elif kind == "data":
            self.vals[node.name] = self.input("tokens", "tokens", self.meta_shape(node), torch.int32)
        del sig

    def _finish(self, output_node) -> Lowered:
        from porter.traced import fold

        outs = output_node.args[0]
        first = outs[0] if isinstance(outs, (list, tuple)) else outs
        self._cur = first
        try:
            logits = self.val(first)
            result = self._output_rows(logits)
        except Gap as gap:
            if gap.node is None:
                gap.node = first
            self.gaps = self.root_gaps(gap)
            return self._lowered(None)
        self._map_modules()
        return fold.prune(self._lowered(result))

    def _map_modules(self) -> None:
        """Name, on the spec node that computes it, the output of every transformers module whose
        forward returns exactly one token-dependent tensor (what parity compares)."""
        from porter.traced.outputs import module_outputs

        by_name = {n.name: n for n in self.nodes}
        for path, fx in module_outputs(self.graph, self.deps).items():
            v = self.vals.get(fx.name)
            if not isinstance(v, Val) or v.tensor is None and not v.lazy or v.scalar is not None:
                continue
            self._cur = fx
            try:
                name = self.tensor(v)
            except Gap:
                continue
            finally:
                self._cur = None
            node = by_name.get(name) or next((n for n in reversed(self.nodes) if n.name == name), None)
            if node is not None and node.hf is None and numel(v.shape) == numel(node.shape):
                node.hf = path

    def _output_rows(self, logits: Val) -> str:
        """Select the rows whose logits are read (``out_ids``) as early as the graph allows, and
        name the logits ``result_output``."""
        from porter.traced.outputs import select_output_rows

        return select_output_rows(self, logits)

    def _lowered(self, output: str | None) -> Lowered:
        return Lowered(nodes=self.nodes, inputs=dict(self.inputs), weights=dict(self.weights),
                       constants=dict(self.constants), hparams=dict(self.hparams), output=output,
                       causal=self.causal if self.causal is not None else True, n_layer=self.n_layer,
                       kv_widths={k: list(v) for k, v in self.kv_width.items()},
                       state_widths={k: list(v) for k, v in self.state_width.items()}, tables=dict(self.tables),
                       gaps=self.gaps)

    def root_gaps(self, gap: Gap) -> list[Gap]:
        """The gaps the output really depends on: follow failed values (GapVal) back from the
        failing node to those whose own inputs lowered fine. Failed values that a pattern
        bypassed are not on this path."""
        start = gap.node
        if start is None:
            return [gap]
        roots: dict[str, Gap] = {}
        seen = set()
        stack = [start]
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            failed = [a for a in n.all_input_nodes if isinstance(self.vals.get(a.name), GapVal)]
            if failed:
                stack.extend(failed)
                continue
            v = self.vals.get(n.name)
            roots.setdefault(n.name, v.gap if isinstance(v, GapVal) else gap)
        return list(roots.values()) or [gap]


def _attr(v):
    if isinstance(v, (list, tuple)):
        return [_attr(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, sympy.Basic):
        return spec_size(v)
    return v


__all__ = ["Emitted", "Lowered", "Lowering", "LayerInfo", "module_path", "module_class", "target_name",
           "numel", "O", "T", "ggml_shape", "ggml_axes"]
