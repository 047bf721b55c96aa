"""Values of a traced graph as the lowering sees them, and their shapes.

A :class:`Val` is one ATen value in porter terms: the spec tensor that holds it and its torch
shape. ggml sees every tensor with ``ne`` = the torch shape reversed (innermost first); tensors of
more than four dimensions drop size-one dimensions, outermost first, to fit ggml's four.

Some values are kept *lazy* because ggml does better without materializing them:

- ``perm``: a pending ``ggml_permute`` of the tensor (transposes and permutes are views, and two
  of them often cancel: attention's ``transpose(1, 2)`` around a head split);
- ``expand``: a broadcast (``torch.expand``) that ggml's binary operators do by themselves;
- ``heads``: a head-interleaving repeat (``repeat_kv`` of grouped-query attention) that
  ``flash_attn`` and ``mul_mat`` do by broadcasting.

Sizes are integers or sympy expressions in the runtime symbols: ``n_tokens`` (tokens of this
forward pass), ``n_kv`` (cache cells attended to) and ``n_out`` (rows whose logits are read).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import sympy

T = sympy.Symbol("n_tokens", integer=True, positive=True)
K = sympy.Symbol("n_kv", integer=True, positive=True)
O = sympy.Symbol("n_out", integer=True, positive=True)  # noqa: E741 - named like the others
RUNTIME = (T, K, O)


@dataclass(eq=False)
class Val:
    tensor: str | None  # spec tensor name (node, graph input or weight); None for a constant scalar
    shape: tuple = ()
    dtype: Any = None  # torch dtype
    kind: str = "data"  # "data" (depends on the tokens) | "weight" (only on weights)
    perm: tuple | None = None  # pending ggml permute axes applied to `tensor`
    dense: bool = True  # `tensor` is one contiguous block (not a window of something larger)
    expand: Val | None = None  # this value is `expand.shape`-broadcast of that Val
    heads: tuple | None = None  # (Val, dim, rep): repeat_interleave(Val, rep, dim)
    scalar: float | None = None  # a constant number (0-d)
    items: list | None = None  # a tuple of values (split, topk)
    meta: dict = field(default_factory=dict)  # pattern notes (e.g. "mask": kind)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_(self, **changes) -> Val:
        return replace(self, **changes)

    @property
    def lazy(self) -> bool:
        return self.perm is not None or self.expand is not None or self.heads is not None


class Gap(Exception):
    """A value that cannot be lowered; carries the op-gap report's entry."""

    def __init__(self, op: str, reason: str, node=None):
        super().__init__(f"{op}: {reason}")
        self.op, self.reason, self.node = op, reason, node


@dataclass(eq=False)
class GapVal:
    """Stands in for a value whose lowering failed, so that the failure counts only if a live
    output needs it (a pattern may consume the nodes around it instead)."""

    gap: Gap


def numel(shape) -> Any:
    n = 1
    for d in shape:
        n = n * d
    return n


def is_sym(d) -> bool:
    return not isinstance(d, int)


def symbols_of(shape) -> list:
    """The runtime symbols of each symbolic dimension, in order (one list entry per dimension)."""
    return [d.free_symbols & set(RUNTIME) for d in shape if is_sym(d)]


def ggml_axes(shape) -> list[int | None]:
    """ggml axis of each torch dimension (None: dropped size-one dimension)."""
    rank = len(shape)
    drop = set()
    extra = rank - 4
    for i, d in enumerate(shape):
        if extra <= 0:
            break
        if d == 1:
            drop.add(i)
            extra -= 1
    if extra > 0:
        raise Gap("shape", f"{rank}-D tensor {list(shape)} has too few size-one dimensions to fit ggml's 4")
    kept = [i for i in range(rank) if i not in drop]
    axes: list[int | None] = [None] * rank
    for j, i in enumerate(kept):
        axes[i] = len(kept) - 1 - j
    return axes


def ggml_shape(shape) -> list:
    """``ne`` (innermost first) of a torch shape."""
    axes = ggml_axes(shape)
    ne = [1, 1, 1, 1]
    for i, a in enumerate(axes):
        if a is not None:
            ne[a] = shape[i]
    n = max((a for a in axes if a is not None), default=-1) + 1
    return ne[:max(n, 1)]


def spec_size(d) -> int | str:
    """A size as the spec writes it: an integer or an expression such as ``"$n_tokens*4"``."""
    if isinstance(d, int):
        return d
    d = sympy.sympify(d)
    if d.is_Integer:
        return int(d)
    return _expr_text(d)


def _expr_text(e) -> str:
    from torch.utils._sympy.functions import FloorDiv

    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        if e not in RUNTIME:
            raise Gap("shape", f"size {e} depends on a symbol that is not the sequence length")
        return "$" + e.name
    if e.is_Add:
        parts = [_expr_text(a) for a in e.args]
        return "(" + "+".join(parts).replace("+-", "-") + ")"
    if e.is_Mul:
        return "*".join(_wrap(a) for a in e.args)
    if isinstance(e, FloorDiv):
        return f"{_wrap(e.args[0])}//{_wrap(e.args[1])}"
    raise Gap("shape", f"size expression {e} is not sums and products of the sequence length")


def _wrap(e) -> str:
    text = _expr_text(e)
    return text if text.startswith("(") or text.lstrip("-").isdigit() or text.startswith("$") and "*" not in text else f"({text})"


def static_int(d) -> int | None:
    if isinstance(d, int):
        return d
    d = sympy.sympify(d)
    return int(d) if d.is_Integer else None
