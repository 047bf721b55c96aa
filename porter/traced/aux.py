"""The *aux* path: graph nodes that depend on neither the token ids' values nor the weights.

They build attention masks, position ids and rotary tables from the sequence length. porter
computes them on the example input and recognises what they are:

- **positions**: ``arange(seq) + c`` is porter's ``positions`` input (offset ``c``);
- **masks** (a value over query x key positions): causal, sliding-window or full, which become
  porter's runtime masks ``kq_mask`` / ``kq_mask_swa`` (the KV cache changes the key positions,
  so the traced mask itself cannot be reused);
- **constants** (no sequence dimension): carried in the spec;
- anything else that has one sequence dimension (rotary cos/sin tables, say) is lowered
  literally from the positions, through the same table as the data path.
"""

from __future__ import annotations

import torch

from porter.traced.export import EXAMPLE_TOKENS
from porter.traced.values import T, Gap, Val, is_sym

F32 = torch.float32
MAX_INLINE = 1 << 16  # elements of a constant carried in the spec


class AuxAnalysis:
    def __init__(self, lw):
        self.lw = lw
        self.trace = lw.trace

    def concrete(self, node):
        values = self.trace.evaluate(only={node.name})
        if node.name not in values:
            raise Gap(_target(node), "cannot compute this mask/position value at trace time", node)
        return values[node.name]

    def value(self, node) -> Val:
        lw = self.lw
        if node.op == "placeholder":
            value = self.trace.buffers.get(node.name)
            if value is None:
                raise Gap("placeholder", f"input {node.name} is neither a weight nor a computed buffer", node)
            return self._constant(value, node)
        meta = node.meta.get("val")
        if isinstance(meta, (int, float, bool)) or isinstance(meta, torch.SymInt):
            return Val(None, (), F32, scalar=float(meta) if not isinstance(meta, torch.SymInt) else None,
                       meta={"size": lw.sym(meta)} if isinstance(meta, torch.SymInt) else {})
        if not isinstance(meta, torch.Tensor):
            raise Gap(_target(node), "aux value that is not a tensor", node)
        shape = lw.meta_shape(node)
        n_seq = sum(1 for d in shape if is_sym(d))
        if n_seq == 0:
            return self._constant(self.concrete(node), node)
        value = self.concrete(node)
        if not value.is_floating_point() and value.numel() and bool((value == value.reshape(-1)[0]).all()) \
                and value.dtype != torch.bool:
            # the same integer everywhere (token type ids of a single segment): usable as an index
            return Val(None, shape, value.dtype, meta={"fill": int(value.reshape(-1)[0])})
        if n_seq == 1 and not value.is_floating_point():
            offset = _position_offset(value)
            if offset is not None:
                pos = lw.input("positions", "positions", shape, torch.int32)
                if offset:
                    pos.meta["offset"] = offset
                return pos
        if n_seq >= 2:
            return Val(None, shape, value.dtype, meta={"mask": self.mask_kind(node, value)})
        return self.literal(node)

    def _constant(self, value, node) -> Val:
        if not isinstance(value, torch.Tensor):
            return Val(None, (), F32, scalar=float(value))
        if value.dim() == 0 or value.numel() == 1 and value.dim() <= 1:
            return Val(None, (), F32, scalar=float(value.reshape(()).item()))
        if not value.is_floating_point():
            flat = value.reshape(-1)
            if value.dtype != torch.bool and bool((flat == flat[0]).all()):
                return Val(None, tuple(value.shape), value.dtype, meta={"fill": int(flat[0])})
            raise Gap(_target(node), f"integer constant {list(value.shape)} on the data path", node)
        if value.numel() > MAX_INLINE:
            raise Gap(_target(node), f"computed constant of {value.numel()} elements (porter carries at most "
                                     f"{MAX_INLINE} in a spec)", node)
        return self.lw.constant(value, _hint(node))

    # -- masks -------------------------------------------------------------------------------
    def mask_kind(self, node, value) -> dict:
        """{"kind": "causal" | "full" | "sliding", "window": w} for a mask over (queries, keys)."""
        v = value
        while v.dim() > 2 and v.shape[0] == 1:
            v = v[0]
        if v.dim() > 2:
            first = v.reshape(-1, *v.shape[-2:])
            if not all(torch.equal(first[0], first[i]) for i in range(first.shape[0])):
                raise Gap(_target(node), "a mask that differs between heads or batch rows", node)
            v = first[0]
        if v.dtype == torch.bool:
            visible = v
        else:
            finite = v[torch.isfinite(v)]
            low = float(torch.finfo(v.dtype).min) / 2 if v.is_floating_point() else -1e30
            if bool(((v > low) & (v != 0)).any()):
                raise Gap(_target(node), "an additive mask carrying position biases", node)
            del finite
            visible = v > low
        n_q, n_k = visible.shape
        if n_q != n_k:
            raise Gap(_target(node), "a mask whose query and key lengths differ", node)
        q = torch.arange(n_q)[:, None]
        k = torch.arange(n_k)[None, :]
        if bool(visible.all()):
            return {"kind": "full"}
        causal = k <= q
        if torch.equal(visible, causal):
            return {"kind": "causal"}
        window = int(visible[-1].sum())
        if 0 < window < n_q and torch.equal(visible, causal & (k > q - window)):
            return {"kind": "sliding", "window": window}
        if v.dtype == torch.bool and not getattr(self, "_inverting", False):
            # a mask of the positions to hide (masked_fill(scores, ~visible, -inf))
            self._inverting = True
            try:
                kind = self.mask_kind(node, ~v)
            except Gap:
                kind = None
            finally:
                self._inverting = False
            if kind is not None:
                return dict(kind, inverted=True)
        raise Gap(_target(node), "an attention mask that is neither causal, full nor a sliding window "
                                 f"({int(visible.sum())} of {visible.numel()} visible)", node)

    # -- literal lowering of position-derived values ---------------------------------------------
    def literal(self, node) -> Val:
        """Lower an aux value with one sequence dimension through the table, its ``arange``
        leaves being porter's positions."""
        from porter.traced.lower import target_name
        from porter.traced.table import TABLE

        lw = self.lw
        target = target_name(node)
        if target in ("aten.arange.default", "aten.arange.start", "aten.arange.start_step"):
            value = self.concrete(node)
            offset = _position_offset(value)
            if offset is None:
                raise Gap(target, "a range that is not the positions", node)
            pos = lw.input("positions", "positions", (lw.meta_shape(node)[0],), torch.int32)
            f = lw.emit("cast", [pos], {"type": "f32"}, shape=pos.shape, role="positions_f32")
            return f if not offset else _add_scalar(lw, f, offset)
        handler = TABLE.get(target)
        if handler is None:
            raise Gap(target, "no lowering rule for this ATen op (on the position path)", node)
        saved = lw._cur
        lw._cur = node
        try:
            return handler(lw, node)
        finally:
            lw._cur = saved


def _add_scalar(lw, v, c):
    from porter.traced.aten import scale

    return scale(lw, v, 1.0, float(c))


def _position_offset(value) -> int | None:
    """c when ``value`` (any shape with EXAMPLE_TOKENS elements along its one long axis) is
    arange(EXAMPLE_TOKENS) + c, else None."""
    if not isinstance(value, torch.Tensor) or value.is_floating_point() and not torch.equal(value, value.round()):
        return None
    flat = value.reshape(-1)
    if flat.numel() != EXAMPLE_TOKENS:
        return None
    steps = flat[1:] - flat[:-1]
    if not bool((steps == 1).all()):
        return None
    return int(flat[0])


def _target(node) -> str:
    from porter.traced.lower import target_name

    return target_name(node) if node is not None else "mask"


def _hint(node) -> str:
    from porter.traced.lower import module_path

    path = module_path(node)
    return (path.rsplit(".", 1)[-1] if path else "model") + "." + node.name


__all__ = ["AuxAnalysis", "T"]
