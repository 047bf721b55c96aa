"""The spec interpreter: turns a graph spec into ggml nodes for one forward pass."""

from __future__ import annotations

import re
from typing import Any

from porter.errors import ModelError, SpecError
from porter.runtime._lib import lib
from porter.runtime.ops import Ops
from porter.runtime.types import GGMLType
from porter.spec import Node, Repeat, Spec

_REF = re.compile(r"^\$(\w+)(\[L\])?$")


class KVCache:
    """Per-layer K and V tensors, ne [n_embd_kv, n_ctx], in one backend buffer."""

    def __init__(self, backend, spec: Spec, n_ctx: int, gtype: GGMLType = GGMLType.F32):
        from porter.runtime.core import Buffer, Context

        hp = spec.hparams
        self.n_ctx = n_ctx
        self.n_layer = int(hp["n_layer"])
        width = int(hp["n_embd_kv"])
        self.ctx = Context(2 * self.n_layer)
        self.k = [self.ctx.new_tensor(gtype, [width, n_ctx], f"cache_k_l{i}") for i in range(self.n_layer)]
        self.v = [self.ctx.new_tensor(gtype, [width, n_ctx], f"cache_v_l{i}") for i in range(self.n_layer)]
        self.buffer = Buffer(self.ctx, backend.buffer_type)
        lib.ggml_backend_buffer_clear(self.buffer.ptr, 0)
        self.n_past = 0  # positions 0..n_past-1 hold valid entries

    @property
    def nbytes(self) -> int:
        return self.buffer.size

    def close(self) -> None:
        self.buffer.close()
        self.ctx.close()


class GraphBuilder:
    """Instantiate a spec's nodes in a ggml context.

    ``symbols`` holds the runtime sizes (n_tokens, n_kv, n_out); ``kv`` is the cache or None
    (then ``kv_store`` passes keys and values of the current tokens straight through).
    """

    def __init__(self, spec: Spec, ops: Ops, weights: dict[str, Any], inputs: dict[str, Any],
                 symbols: dict[str, int], kv: KVCache | None = None):
        self.spec, self.ops, self.weights, self.inputs, self.kv = spec, ops, weights, inputs, kv
        self.values = dict(spec.hparams)
        self.values.update(symbols)
        self.tensors: dict[str, Any] = {}

    # -- values ----------------------------------------------------------------------------------
    def value(self, v: Any, layer: int | None) -> Any:
        if isinstance(v, list):
            return [self.value(x, layer) for x in v]
        if isinstance(v, str) and v.startswith("$"):
            m = _REF.match(v)
            if not m or m.group(1) not in self.values:
                raise SpecError(f"unknown reference {v!r}")
            out = self.values[m.group(1)]
            return out[layer] if m.group(2) else out
        return v

    def tensor(self, name: str, layer: int | None, carry):
        if name == "$carry":
            return carry
        if name.startswith("$"):
            name = self.value(name, layer)
        if layer is not None and "{L}" in name:
            name = name.format(L=layer)
        for table in (self.tensors, self.inputs, self.weights):
            t = table.get(name)
            if t is not None:
                return t
        raise ModelError(f"graph node input {name!r} is neither a node, an input nor a loaded weight")

    # -- building --------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        carry = None
        for item in self.spec.graph:
            if isinstance(item, Repeat):
                carry = self.tensor(item.init, None, None)
                for layer in range(int(self.values[item.repeat])):
                    for node in item.body:
                        self.emit(node, layer, carry)
                    carry = self.tensors[item.result.format(L=layer)]
            else:
                self.emit(item, None, carry)
        return self.tensors

    def emit(self, node: Node, layer: int | None, carry) -> None:
        name = node.name.format(L=layer) if layer is not None else node.name
        srcs = [self.tensor(s, layer, carry) for s in node.inputs]
        if node.when is not None and not self.value(node.when, layer):
            self.tensors[name] = srcs[0]
            return
        a = {k: self.value(v, layer) for k, v in node.attrs.items()}
        out = self.apply(node.op, srcs, a, layer)
        Ops.name(out, name)
        self.tensors[name] = out

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
            t = s[0]
            start, length = int(a["start"]), int(a["length"])
            if start < 0 or start + length > t.ne[0]:
                raise SpecError(f"slice [{start}, {start + length}) is outside a row of {t.ne[0]}")
            return o.view(t, [length, t.ne[1], t.ne[2], t.ne[3]], [t.nb[1], t.nb[2], t.nb[3]],
                          start * GGMLType(t.type).type_size)
        if op == "permute":
            return o.permute(s[0], a["axes"])
        if op == "concat":
            return o.concat(s[0], s[1], int(a["dim"]))
        if op == "cast":
            return o.cast(s[0], GGMLType.parse(a["type"]))
        if op == "argsort":
            return o.argsort(s[0], a.get("descending", True))
        if op == "top_k":
            return o.top_k(s[0], int(a["k"]))
        if op == "kv_store":
            return self.kv_store(s[0], a["cache"], layer)
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
        cache = (self.kv.k if which == "k" else self.kv.v)[layer]
        if x.ne[0] * x.ne[1] != cache.ne[0]:
            raise SpecError(f"kv_store: rows of {x.ne[0]}x{x.ne[1]} do not match the cache width {cache.ne[0]}")
        rows = o.reshape(x, [x.ne[0] * x.ne[1], x.ne[2]])
        stored = o.set_rows(cache, rows, self.inputs["kv_slots"])
        n_kv = int(self.values["n_kv"])
        head_bytes = lib.ggml_row_size(cache.type, x.ne[0])  # a quantized cache stores blocks, not elements
        return o.view(stored, [x.ne[0], x.ne[1], n_kv], [head_bytes, cache.nb[1], cache.nb[1] * n_kv], 0)


_SIMPLE = {"silu", "gelu_erf", "gelu_tanh", "relu", "sigmoid", "tanh", "exp", "sqr", "sqrt", "cont",
           "transpose", "sum_rows", "add", "sub", "mul", "div", "mul_mat", "get_rows", "mul_mat_id"}
