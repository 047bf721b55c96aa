"""The spec interpreter: turns a graph spec into ggml nodes for one forward pass."""

from __future__ import annotations

from typing import Any

from porter.errors import ModelError, SpecError
from porter.runtime._lib import ffi, lib
from porter.runtime.ops import Ops
from porter.runtime.plan import GraphPlan
from porter.runtime.types import GGMLType
from porter.spec import Spec


def cache_widths(spec: Spec, which: str) -> list[int]:
    """Row width of each layer's K (or V) cache: ``kv_width_k``/``kv_width_v`` (a number or a
    per-layer list; 0 = the layer has no cache) when the spec states them, else ``n_embd_kv``."""
    hp = spec.hparams
    n_layer = int(hp["n_layer"])
    width = hp.get(f"kv_width_{which}", hp.get("n_embd_kv", 0))
    widths = [int(w) for w in width] if isinstance(width, list) else [int(width)] * n_layer
    if len(widths) != n_layer:
        raise SpecError(f"kv_width_{which} lists {len(widths)} layers, n_layer is {n_layer}")
    return widths


ABSENT = object()  # a node switched off in a layer whose first input that layer lacks


def cache_names(spec: Spec) -> list[str]:
    """The caches a spec's layers keep: k and v, plus k1, v1, ... for layers that attend more than
    once to different keys or values (``kv_width_k1``...)."""
    extra = sorted(k[len("kv_width_"):] for k in spec.hparams if k.startswith("kv_width_") and k not in
                   ("kv_width_k", "kv_width_v"))
    return ["k", "v"] + extra


def state_names(spec: Spec) -> list[str]:
    """The recurrent states a spec's layers keep (``state_width_<name>``: F32 elements per layer,
    a number or a per-layer list, 0 = none): a fixed-size memory of the last steps, overwritten
    by every pass (``state_store``), not a row per position like the K and V caches."""
    return sorted(k[len("state_width_"):] for k in spec.hparams if k.startswith("state_width_"))


def state_widths(spec: Spec, name: str) -> list[int]:
    n_layer = int(spec.hparams["n_layer"])
    width = spec.hparams[f"state_width_{name}"]
    widths = [int(w) for w in width] if isinstance(width, list) else [int(width)] * n_layer
    if len(widths) != n_layer:
        raise SpecError(f"state_width_{name} lists {len(widths)} layers, n_layer is {n_layer}")
    return widths


def kv_cache_bytes(spec: Spec, n_ctx: int, gtype: GGMLType = GGMLType.F32) -> int:
    """Bytes the KV cache of ``n_ctx`` positions takes (recurrent states included: F32, one copy)."""
    widths = sum(w for name in cache_names(spec) for w in cache_widths(spec, name))
    states = sum(w for name in state_names(spec) for w in state_widths(spec, name))
    return widths * n_ctx * int(lib.ggml_type_size(int(gtype))) // int(lib.ggml_blck_size(int(gtype))) + 4 * states


class KVCache:
    """Per-layer cache tensors (K, V, and any extra ones), ne [width, n_ctx], in one backend
    buffer (None for a layer without that cache)."""

    def __init__(self, backend, spec: Spec, n_ctx: int, gtype: GGMLType = GGMLType.F32, huge_pages: bool = False):
        from porter.runtime.core import Buffer, Context

        self.n_ctx = n_ctx
        self.n_layer = int(spec.hparams["n_layer"])
        widths = {name: cache_widths(spec, name) for name in cache_names(spec)}
        states = {name: state_widths(spec, name) for name in state_names(spec)}
        count = sum(w > 0 for ws in (*widths.values(), *states.values()) for w in ws)
        self.ctx = Context(max(1, count))
        self.caches = {name: [self.ctx.new_tensor(gtype, [w, n_ctx], f"cache_{name}_l{i}") if w else None
                              for i, w in enumerate(ws)] for name, ws in widths.items()}
        self.states = {name: [self.ctx.new_tensor(GGMLType.F32, [w], f"state_{name}_l{i}") if w else None
                              for i, w in enumerate(ws)] for name, ws in states.items()}
        self.k, self.v = self.caches["k"], self.caches["v"]
        need = kv_cache_bytes(spec, n_ctx, gtype)
        self.buffer = Buffer(self.ctx, backend.buffer_type, f"the KV cache ({need / 2**20:.0f} MiB for n_ctx={n_ctx})")
        lib.ggml_backend_buffer_clear(self.buffer.ptr, 0)
        self.migration = self._to_huge_pages([self.buffer]) if huge_pages else None
        self.n_past = 0  # positions 0..n_past-1 hold valid entries

    def clear_states(self) -> None:
        """Zero the recurrent states (a new sequence starts; K and V rows are masked instead)."""
        for tensors in self.states.values():
            for t in tensors:
                if t is not None:
                    lib.ggml_backend_tensor_memset(t, 0, 0, lib.ggml_nbytes(t))

    @property
    def nbytes(self) -> int:
        return self.buffer.size

    def _to_huge_pages(self, buffers):
        """Start collapsing the CPU's buffers among ``buffers`` onto huge pages (in the background:
        porter.runtime.hugepages)."""
        from porter.runtime.hugepages import Migration, buffer_ranges

        return Migration.start(owner=buffers, collapse=buffer_ranges(buffers))

    def close(self) -> None:
        if self.migration is not None:  # before the memory it works on goes
            self.migration.stop()
        self.buffer.close()
        self.ctx.close()


class EarlyRowsUnfit(Exception):
    """An early output-row selection met a tensor that is not [features, tokens]: build the
    graph as the spec writes it instead."""


class GraphBuilder:
    """Instantiate a spec's nodes in a ggml context, from its :class:`~porter.runtime.plan.GraphPlan`.

    ``symbols`` holds the runtime sizes (n_tokens, n_kv, n_out); ``kv`` is the cache or None
    (then ``kv_store`` passes keys and values of the current tokens straight through);
    ``early_rows``: select the output rows as early as the plan found they can be (fewer rows
    through the last layer's row-wise steps; raises :class:`EarlyRowsUnfit` when a shape does
    not allow it); ``fuse``: compute the gated activations the plan marked in one kernel each, and
    the products it stacked (``Step.part``) as one ``mul_mat`` each.
    """

    def __init__(self, spec: Spec, ops: Ops, weights: dict[str, Any], inputs: dict[str, Any],
                 symbols: dict[str, int], kv: KVCache | None = None, plan: GraphPlan | None = None,
                 early_rows: bool = False, fuse: bool = False):
        self.spec, self.ops, self.weights, self.inputs, self.kv = spec, ops, weights, inputs, kv
        self.plan = plan if plan is not None else GraphPlan(spec, weights)
        self.values = dict(self.plan.values)
        self.values.update(symbols)
        self.rows = self.plan.rows if early_rows else None
        self.fuse = fuse  # silu + mul pairs the plan marked as one GLU kernel
        self.tensors: dict[str, Any] = {}
        self.side_effects: list[Any] = []  # state writes: in the graph though no output reads them
        self._selected: dict[str, Any] = {}  # early rows: source name -> its output rows
        self._stacked: dict[str, Any] = {}  # stacked products built so far, by name

    def value(self, v: Any, layer: int | None) -> Any:
        return self.plan.value(v, layer, self.values)

    def tensor(self, name: str | None, layer: int | None = None):
        if name is None:
            raise SpecError("$carry read outside the layer loop")
        t = self.tensors.get(name)
        if t is None:
            t = self.inputs.get(name)
            if t is None:
                t = self.weights.get(name)
                if t is None:
                    raise ModelError(f"graph node input {name!r} is neither a node, an input nor a loaded weight")
        if t is ABSENT:
            raise SpecError(f"graph node input {name!r} is switched off (when) in layer {layer} but read")
        return t

    # -- building --------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        tensors, rows = self.tensors, self.rows
        for st in self.plan.steps:
            on = st.on if st.on is True or st.on is False else bool(self.value(st.on, st.layer))
            if not on:
                # switched off in this layer: pass the first input through (the others, such as
                # weights only some layers have, are not even looked up); a first input the layer
                # does not have makes the node absent, an error only if something reads it
                try:
                    t = self.tensor(st.inputs[0], st.layer)
                except (ModelError, SpecError):  # a weight or node this layer does not have
                    t = ABSENT
                if rows is not None and st.select and t is not ABSENT:
                    t = self._rows_of(st.inputs[0], t)
                tensors[st.name] = t
                continue
            if self.fuse and (st.in_glu or st.glu is not None):
                if st.glu is not None:  # its silu input was skipped: both in one kernel
                    tensors[st.name] = self._swiglu(st)
                continue
            if self.fuse and st.part is not None:
                tensors[st.name] = self._part(st)
                continue
            srcs = [self.tensor(s, st.layer) for s in st.inputs]
            if rows is not None:
                if st.name == rows.root:  # its input is already those rows
                    tensors[st.name] = srcs[0]
                    continue
                for i in st.select:
                    srcs[i] = self._rows_of(st.inputs[i], srcs[i])
            a = st.attrs
            if st.dynamic:
                a = dict(a)
                for k, v in st.dynamic.items():
                    a[k] = self.value(v, st.layer)
            out = self.apply(st.op, srcs, a, st.layer)
            lib.ggml_set_name(out, st.label)
            tensors[st.name] = out
        return tensors

    def _part(self, st):
        """A product computed inside its stacked product: a view of its rows there."""
        group, first = st.part
        product = self._stacked.get(group.name)
        if product is None:
            x = self.tensor(group.x, st.layer)
            if self.rows is not None and group.select:
                x = self._rows_of(group.x, x)
            product = self.ops.mul_mat(group.weight, x)
            lib.ggml_set_name(product, group.label)
            self._stacked[group.name] = product
        rows = int(self.weights[st.inputs[0]].ne[1])
        out = self.ops.view(product, [rows, product.ne[1], product.ne[2], product.ne[3]],
                            [product.nb[1], product.nb[2], product.nb[3]], first * product.nb[0])
        lib.ggml_set_name(out, st.label)
        return out

    def _swiglu(self, st):
        """``mul(silu(a), b)`` as one GLU node named as the mul, or as the two nodes when the
        operands' layout does not suit the fused kernel."""
        act, i = st.glu
        a, b = self.tensor(act.inputs[0], st.layer), self.tensor(st.inputs[1 - i], st.layer)
        if self.rows is not None:
            if act.select:
                a = self._rows_of(act.inputs[0], a)
            if 1 - i in st.select:
                b = self._rows_of(st.inputs[1 - i], b)
        if i == 0 and _halves(a, b):  # gate and up stacked, gate first: the GLU of the product
            out = self.ops.glu_halves(a.view_src)
        elif Ops.swiglu_fits(a, b):
            out = self.ops.swiglu(a, b)
        else:
            gate = self.apply("silu", [a], {}, st.layer)
            lib.ggml_set_name(gate, act.label)
            self.tensors[act.name] = gate
            out = self.apply("mul", [gate, b] if i == 0 else [b, gate], {}, st.layer)
        lib.ggml_set_name(out, st.label)
        return out

    def _rows_of(self, name: str, t):
        """The output rows of ``t`` (``get_rows`` by out_ids), made once per source."""
        got = self._selected.get(name)
        if got is None:
            if (t.type != GGMLType.F32 or t.ne[1] != self.values["n_tokens"] or t.ne[2] != 1 or t.ne[3] != 1
                    or t.nb[0] != 4):
                raise EarlyRowsUnfit(name)
            got = self.ops.get_rows(t, self.inputs[self.rows.out_ids])
            Ops.name(got, f"{name}-rows")
            self._selected[name] = got
        return got

    def apply(self, op: str, s: list, a: dict[str, Any], layer: int | None):
        o = self.ops
        if op in _SIMPLE:
            return getattr(o, op)(*s)
        if op in ("rms_norm", "norm", "l2_norm"):
            return getattr(o, op)(s[0], a["eps"])
        if op == "scale":
            return o.scale(s[0], a["s"], a.get("bias", 0.0))
        if op == "softcap":
            return o.softcap(s[0], a["cap"])
        if op == "rope":
            return o.rope(s[0], s[1], int(a["n_dims"]), int(a["mode"]), freq_factors=s[2] if len(s) > 2 else None,
                          freq_base=a["freq_base"], freq_scale=a.get("freq_scale", 1.0),
                          n_ctx_orig=int(a.get("n_ctx_orig", 0)), ext_factor=a.get("ext_factor", 0.0),
                          attn_factor=a.get("attn_factor", 1.0), beta_fast=a.get("beta_fast", 32.0),
                          beta_slow=a.get("beta_slow", 1.0))
        if op == "soft_max":
            return o.soft_max(s[0], s[1] if len(s) > 1 else None, a.get("scale", 1.0), a.get("max_bias", 0.0))
        if op == "flash_attn":
            return o.flash_attn(s[0], s[1], s[2], s[3] if len(s) > 3 else None, a["scale"],
                                a.get("max_bias", 0.0), a.get("softcap", 0.0))
        if op == "reshape":
            return o.reshape(s[0], [int(x) for x in a["shape"]])
        if op == "slice":
            return o.window(s[0], int(a.get("dim", 0)), int(a["start"]), int(a["length"]), int(a.get("step", 1)))
        if op == "clamp":
            return o.clamp(s[0], float(a["min"]), float(a["max"]))
        if op == "repeat":
            return o.repeat(s[0], [int(x) for x in a["shape"]])
        if op == "pad":
            return o.pad(s[0], [int(x) for x in a["pads"]])
        if op == "fill":
            return o.fill(s[0], float(a["value"]))
        if op == "permute":
            return o.permute(s[0], a["axes"])
        if op == "concat":
            return o.concat(s[0], s[1], int(a["dim"]))
        if op == "cast":
            return o.cast(s[0], GGMLType.parse(a["type"]))
        if op == "argsort":
            return o.argsort(s[0], a.get("descending", True))
        if op == "argmax":
            return o.argmax(s[0])
        if op == "top_k":
            return o.top_k(s[0], int(a["k"]))
        if op == "kv_store":
            return self.kv_store(s[0], a["cache"], int(a["layer"]) if "layer" in a else layer)
        if op == "state_store":
            return self.state_store(s[0], a["cache"], int(a["rows"]), int(a["layer"]) if "layer" in a else layer)
        if op == "ssm_conv":
            return self.ops.ssm_conv(s[0], s[1])
        if op == "delta_net":
            return self.delta_net(s, a["cache"], int(a["layer"]) if "layer" in a else layer)
        if op == "ssm_scan":
            return self.ssm_scan(s, a["cache"], int(a["layer"]) if "layer" in a else layer)
        if op == "mean_pool":
            t = s[0]  # [n_embd, n_tokens] -> [n_embd, 1]
            return o.scale(o.cont(o.transpose(o.sum_rows(o.cont(o.transpose(t))))), 1.0 / t.ne[1])
        raise SpecError(f"op {op!r} has no lowering in this runtime")

    def kv_store(self, x, which: str, layer: int):
        """Write this step's keys or values into the cache; return all cached rows
        as ne [head_dim, n_head_kv, n_kv]."""
        if self.kv is None:
            return x
        o = self.ops
        if layer is None or not 0 <= layer < self.kv.n_layer:
            raise SpecError(f"kv_store outside the layer loop needs a layer attribute (got {layer})")
        if which not in self.kv.caches:
            raise SpecError(f"kv_store: no cache named {which!r} (the spec states kv_width_{which})")
        cache = self.kv.caches[which][layer]
        if cache is None:
            raise SpecError(f"kv_store: layer {layer} has no {which.upper()} cache (its kv_width_{which} is 0)")
        if x.ne[0] * x.ne[1] != cache.ne[0]:
            raise SpecError(f"kv_store: rows of {x.ne[0]}x{x.ne[1]} do not match the cache width {cache.ne[0]}")
        rows = o.reshape(x, [x.ne[0] * x.ne[1], x.ne[2]])
        stored = o.set_rows(cache, rows, self.inputs["kv_slots"])
        n_kv = int(self.values["n_kv"])
        head_bytes = lib.ggml_row_size(cache.type, x.ne[0])  # a quantized cache stores blocks, not elements
        return o.view(stored, [x.ne[0], x.ne[1], n_kv], [head_bytes, cache.nb[1], cache.nb[1] * n_kv], 0)

    def state_store(self, x, which: str, rows: int, layer: int):
        """x ne [C, n] (this pass's steps) -> ne [C, rows + n]: the layer's last ``rows`` steps
        before them (zeros when a sequence starts, or without a cache), then x; the last ``rows``
        steps of that are kept for the next pass."""
        o = self.ops
        if x.ne[2] != 1 or x.ne[3] != 1 or rows < 1:
            raise SpecError(f"state_store: needs steps ne [C, n] and rows >= 1 (got {list(x.ne)}, rows={rows})")
        if self.kv is None:
            return o.pad(x, [0, 0, rows, 0])
        state = self._state("state_store", which, layer, int(x.ne[0]) * rows)
        if x.type != GGMLType.F32:
            x = o.cast(x, GGMLType.F32)
        if not lib.ggml_is_contiguous(x):
            x = o.cont(x)
        def as_rows():  # the state viewed as `rows` steps of C
            return o.view(state, [x.ne[0], rows], [x.nb[1], x.nb[1] * rows, x.nb[1] * rows], 0)

        steps = o.concat(as_rows(), x, 1)
        self.side_effects.append(o.cpy(o.window(steps, 1, int(x.ne[1]), rows), as_rows()))
        return steps

    def _state(self, op: str, which: str, layer: int, elements: int):
        """The layer's recurrent state ``which`` (F32, ``elements`` long), checked against the spec."""
        if layer is None or not 0 <= layer < self.kv.n_layer:
            raise SpecError(f"{op} outside the layer loop needs a layer attribute (got {layer})")
        if which not in self.kv.states:
            raise SpecError(f"{op}: no state named {which!r} (the spec states state_width_{which})")
        state = self.kv.states[which][layer]
        if state is None or state.ne[0] != elements:
            have = 0 if state is None else state.ne[0]
            raise SpecError(f"{op}: layer {layer} keeps {have} elements of {which!r}, {elements} needed")
        return state

    def _on_state(self, op: str, which: str, layer: int, ne: list[int], compute):
        """``compute(state)`` -> (output, state after) on the layer's recurrent state ``which``
        viewed as ``ne`` (zeros without a cache); the state after is kept for the next pass."""
        o = self.ops
        if self.kv is None:
            return compute(o.zeros(ne))[0]
        state = o.reshape(self._state(op, which, layer, ne[0] * ne[1] * ne[2]), ne)
        out, after = compute(state)
        self.side_effects.append(o.cpy(after, state))
        return out

    def delta_net(self, s, which: str, layer: int):
        """q, k, v, g, beta -> the gated delta rule's output ne [S, H, n], from the layer's memory
        (ne [S, S, H]; zeros when a sequence starts, or without a cache)."""
        S, H = s[2].ne[0], s[2].ne[1]
        return self._on_state("delta_net", which, layer, [S, S, H], lambda m: self.ops.gated_delta_net(*s, m))

    def ssm_scan(self, s, which: str, layer: int):
        """x, dt, A, B, C -> the selective scan's output ne [P, H, n], from the layer's state
        (ne [N, P, H]; zeros when a sequence starts, or without a cache)."""
        P, H, N = s[0].ne[0], s[0].ne[1], s[3].ne[0]
        return self._on_state("ssm_scan", which, layer, [N, P, H], lambda st: self.ops.ssm_scan(*s, st))


def _halves(a, b) -> bool:
    """Whether ``a`` and ``b`` are the first and second half of the rows of one dense tensor."""
    src = a.view_src
    return (src != ffi.NULL and b.view_src == src and src.type == GGMLType.F32 and a.view_offs == 0
            and b.view_offs == a.ne[0] * 4 and src.ne[0] == 2 * a.ne[0] and b.ne[0] == a.ne[0]
            and all(a.ne[i] == b.ne[i] == src.ne[i] for i in (1, 2, 3)) and lib.ggml_is_contiguous(src))


_SIMPLE = {"silu", "gelu_erf", "gelu_tanh", "relu", "sigmoid", "tanh", "exp", "sqr", "sqrt", "cont",
           "transpose", "sum_rows", "relu2", "add", "sub", "mul", "div", "mul_mat", "get_rows", "mul_mat_id",
           "neg", "abs", "cos", "sin", "log", "recip", "softplus", "gelu_quick", "elu", "step", "cumsum", "expm1", "floor", "ceil", "round", "trunc"}
