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
from porter.traced.values import T, Gap, Val, ggml_shape, is_sym

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
        if isinstance(meta, (list, tuple)) and all(isinstance(m, torch.Tensor) for m in meta):
            return self.literal(node)  # split/chunk of a position-derived table: its pieces
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
                seq = next(d for d in shape if is_sym(d))
                one_row = ggml_shape(shape)[0] == seq
                pos = lw.input("positions", "positions", shape if one_row else (seq,), torch.int32)
                if not one_row:  # porter's positions are one row; a shape like [1, T, 1] is a view of it
                    pos = lw.reshape(pos, shape)
                if offset:
                    pos = pos.with_(meta={})
                    pos.meta["offset"] = offset
                return pos
        if n_seq >= 2:
            return Val(None, shape, value.dtype, meta={"mask": self.mask_kind(node, value)})
        try:
            return self.literal(node)
        except Gap as gap:
            table = self.position_table(node, shape)
            if table is None:
                raise gap
            return table

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
        elif v.is_floating_point() and bool(((v == 0) | (v == 1)).all()) and bool((v == 1).any()):
            visible = v == 1  # a multiplicative 0/1 mask (GPT-1's causal buffer)
            kind = self._classify(node, visible)
            return dict(kind, multiplicative=True)
        else:
            low = float(torch.finfo(v.dtype).min) / 2 if v.is_floating_point() else -1e30
            hidden = v[v != 0]
            if hidden.numel() and bool((hidden <= -200).all()) and bool((hidden == hidden[0]).all()):
                low = float(hidden[0]) / 2  # a large finite "minus infinity" (-1e4, -1e9): softmax gives 0 alike
            if bool(((v > low) & (v != 0)).any()):
                raise Gap(_target(node), "an additive mask carrying position biases", node)
            visible = v > low
        return self._classify(node, visible)

    def _classify(self, node, visible) -> dict:
        v = visible
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

    # -- per-position tables --------------------------------------------------------------------
    def position_table(self, node, shape) -> Val | None:
        """A value with one sequence axis whose every row depends only on its position (sinusoid
        tables, position-dependent scales): computed once for every position the model takes and
        looked up by porter's positions (``get_rows``). None when it is not such a value."""
        lw = self.lw
        cfg = self.trace.config
        limit = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 0)
        if self.trace.static or not 16 < limit <= 1 << 17:
            return None
        meta = node.meta.get("val")
        if not isinstance(meta, torch.Tensor) or not meta.is_floating_point():
            return None
        seq = [i for i, d in enumerate(shape) if is_sym(d)]
        if len(seq) != 1 or shape[seq[0]] != T:
            return None
        try:
            full = self.trace.evaluate(only={node.name}, length=limit).get(node.name)
        except Exception:  # noqa: BLE001 - not evaluable at that length: not a table
            return None
        short = self.concrete(node)
        if full is None or not isinstance(full, torch.Tensor) or full.shape[seq[0]] != limit:
            return None
        axis = seq[0]
        head = full.narrow(axis, 0, short.shape[axis])
        if not torch.allclose(head.to(torch.float64), short.to(torch.float64), rtol=1e-6, atol=1e-7):
            return None  # rows change with the length: not a per-position function
        rows = full.movedim(axis, 0).reshape(limit, -1).to(torch.float32)
        if rows.numel() > 1 << 24:
            return None
        table = lw.constant(rows, f"position_table.{node.name}", big=True)
        pos = lw.input("positions", "positions", (T,), torch.int32)
        got = lw.emit("get_rows", [table, pos], shape=(T, rows.shape[1]), role="position_table")
        moved = tuple([T] + [d for i, d in enumerate(shape) if i != axis])
        out = lw.reshape(got, moved)
        return lw.permute(out, _back(axis, len(shape)))

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


def _back(axis: int, rank: int) -> list[int]:
    """The permutation that moves dimension 0 back to ``axis``."""
    order = list(range(1, rank))
    order.insert(axis, 0)
    return order


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
