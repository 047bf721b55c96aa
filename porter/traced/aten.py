"""One rule per ATen op: what porter's op vocabulary makes of it.

Each rule receives the lowering (``lw``) and the fx node; ``lw.val(arg)`` gives an argument's
lowered value (:class:`~porter.traced.values.Val`, or a python number/list). Shapes are torch's;
ggml sees them reversed (see :mod:`porter.traced.values`). Fused patterns (norms, rotary
embeddings, attention) are tried first by the rules of the ops they end in
(:mod:`porter.traced.patterns`); when a pattern does not match, the op is lowered literally.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch

from porter.traced import patterns
from porter.traced.table import lowers
from porter.traced.values import Gap, Val, ggml_shape, is_sym, numel, spec_size, static_int

F32 = torch.float32
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _scalar(x):
    """A python number for a constant argument, else None."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, Val) and x.scalar is not None and x.tensor is None:
        return float(x.scalar)
    return None


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _float_val(v: Val, what: str) -> Val:
    if not isinstance(v, Val):
        raise Gap(what, f"expected a tensor, got {v!r}")
    if v.dtype is not None and v.dtype not in _FLOATS and v.dtype != torch.bool:
        raise Gap(what, f"{str(v.dtype).replace('torch.', '')} tensor on the data path (porter computes in float32)")
    return v


# -- elementwise helpers ------------------------------------------------------------------------
def elementwise(lw, v: Val, op: str, attrs: dict | None = None, role: str | None = None) -> Val:
    """Apply a shape-preserving op; lazy views (permutes, broadcasts, head repeats) are kept, the
    op runs on the tensor underneath."""
    v = _float_val(patterns.runtime_mask(lw, v), op)
    if v.expand is not None:
        inner = elementwise(lw, v.expand, op, attrs, role)
        return v.with_(expand=inner, tensor=None)
    if v.heads is not None:
        src, dim, rep = v.heads
        return v.with_(heads=(elementwise(lw, src, op, attrs, role), dim, rep), tensor=None)
    if not v.dense:
        v = lw.contiguous(v)
    base = Val(v.tensor, _unpermuted_shape(lw, v), v.dtype, kind=v.kind)
    out = lw.emit(op, [base], attrs or {}, shape=base.shape, kind=v.kind, role=role)
    return out.with_(shape=v.shape, perm=v.perm)


def _unpermuted_shape(lw, v: Val) -> tuple:
    """The torch shape of the tensor under a pending permute (ne of the tensor, reversed)."""
    if v.perm is None:
        return v.shape
    ne = ggml_shape(v.shape) + [1] * (4 - len(ggml_shape(v.shape)))
    base = [1, 1, 1, 1]
    for a in range(4):
        base[a] = ne[v.perm[a]]
    n = 4
    while n > 1 and base[n - 1] == 1:
        n -= 1
    return tuple(reversed(base[:n]))


def scale(lw, v: Val, s: float, bias: float = 0.0) -> Val:
    attrs = {"s": float(s)}
    if bias:
        attrs["bias"] = float(bias)
    return elementwise(lw, v, "scale", attrs)


def binary(lw, op: str, a, b) -> Val:
    """add / sub / mul / div of two tensors or a tensor and a number, torch broadcasting."""
    a, b = patterns.runtime_mask(lw, a), patterns.runtime_mask(lw, b)
    sa, sb = _scalar(a), _scalar(b)
    if sa is not None and sb is not None:
        fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[op]
        return Val(None, (), F32, scalar=fn(sa, sb))
    if sb is not None:
        a = _float_val(a, op)
        if op == "add":
            return a if sb == 0 else scale(lw, a, 1.0, sb)
        if op == "sub":
            return a if sb == 0 else scale(lw, a, 1.0, -sb)
        if op == "mul":
            return a if sb == 1 else scale(lw, a, sb)
        return a if sb == 1 else scale(lw, a, 1.0 / sb)
    if sa is not None:
        b = _float_val(b, op)
        if op in ("add", "mul"):
            return binary(lw, op, b, sa)
        if op == "sub":
            return scale(lw, b, -1.0, sa)
        return scale(lw, elementwise(lw, b, "recip"), sa)
    a, b = _float_val(a, op), _float_val(b, op)
    out_shape = lw.broadcast_shape(a.shape, b.shape)
    # same lazy permute on both sides: compute underneath, keep the view
    if a.perm is not None and a.perm == b.perm and a.shape == b.shape and a.dense and b.dense \
            and a.expand is None and b.expand is None and a.heads is None and b.heads is None:
        base_a = Val(a.tensor, _unpermuted_shape(lw, a), a.dtype, kind=a.kind)
        base_b = Val(b.tensor, _unpermuted_shape(lw, b), b.dtype, kind=b.kind)
        out = lw.emit(op, [base_a, base_b], shape=base_a.shape)
        return out.with_(shape=a.shape, perm=a.perm)
    a, b = _unexpand(a, out_shape), _unexpand(b, out_shape)
    commutes = op in ("add", "mul")
    first, second = a, b
    if tuple(a.shape) != tuple(out_shape) and commutes and _fits(b.shape, out_shape) and tuple(b.shape) == tuple(out_shape):
        first, second = b, a
    if tuple(first.shape) != tuple(out_shape):
        first = lw.plain(Val(None, out_shape, first.dtype, kind=first.kind, expand=first))
    if not _divides(second.shape, out_shape):
        second = lw.plain(Val(None, out_shape, second.dtype, kind=second.kind, expand=second))
    first, second = lw.rows(lw.plain(first)), lw.rows(lw.plain(second))
    if len(second.shape) > len(out_shape):
        second = lw.reshape(second, second.shape[len(second.shape) - len(out_shape):])
    return lw.emit(op, [first, second], shape=out_shape)


def _unexpand(v: Val, out_shape) -> Val:
    """Drop a lazy broadcast when ggml's own broadcasting does the same."""
    if v.expand is not None and _divides(v.expand.shape, out_shape):
        return v.expand
    return v


def _fits(shape, out_shape) -> bool:
    return len(shape) <= len(out_shape)


def _divides(shape, out_shape) -> bool:
    """Whether ggml can broadcast a tensor of ``shape`` over ``out_shape`` (every ggml axis divides)."""
    if len(shape) > len(out_shape):
        extra = shape[:len(shape) - len(out_shape)]
        if any(d != 1 for d in extra):
            return False
        shape = shape[len(shape) - len(out_shape):]
    a, b = ggml_shape((1,) * (len(out_shape) - len(shape)) + tuple(shape)), ggml_shape(out_shape)
    a = a + [1] * (len(b) - len(a))
    if len(a) > len(b):
        return False
    for x, y in zip(a, b):
        if x == y or x == 1:
            continue
        xi, yi = static_int(x), static_int(y)
        if xi is None or yi is None or yi % xi:
            return False
    return True


# -- identities ---------------------------------------------------------------------------------
@lowers("aten.alias.default", "aten.clone.default", "aten.detach.default", "aten.lift_fresh_copy.default",
        "aten.contiguous.default")
def identity(lw, node):
    """the same value (copies and aliases are a matter of layout, which porter tracks itself)"""
    return lw.val(node.args[0])


@lowers("aten.dropout.default", "aten.native_dropout.default")
def dropout(lw, node):
    """the input (models are traced in eval mode)"""
    return lw.val(node.args[0])


@lowers("aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default")
def assertion(lw, node):
    """nothing (a trace-time check)"""
    return Val(None, (), F32, scalar=0.0)


@lowers("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.type_as.default")
def to_copy(lw, node):
    """nothing for float32; other float types round through ggml's F16/BF16 (``cast`` twice)"""
    v = lw.val(node.args[0])
    dtype = node.kwargs.get("dtype") or (node.args[1] if len(node.args) > 1 and isinstance(node.args[1], torch.dtype) else None)
    if dtype is None:
        dtype = lw.meta_dtype(node)
    if _scalar(v) is not None:
        return v
    if v.dtype == torch.bool and dtype in _FLOATS:
        return v.with_(dtype=F32)  # booleans are held as 0/1 floats already
    if dtype == torch.bool and v.dtype in _FLOATS:
        return ne_zero(lw, v)
    if v.dtype == dtype or (dtype in _FLOATS and v.dtype in (torch.float32, torch.float64) and dtype in (torch.float32, torch.float64)):
        return v.with_(dtype=dtype if dtype != torch.float64 else v.dtype)
    if dtype in (torch.float16, torch.bfloat16) and v.dtype == F32:
        target = "f16" if dtype == torch.float16 else "bf16"
        c = lw.contiguous(v)
        low = lw.emit("cast", [c], {"type": target}, shape=c.shape, dtype=dtype)
        return low
    if dtype == F32 and v.dtype in (torch.float16, torch.bfloat16):
        return lw.emit("cast", [lw.contiguous(v)], {"type": "f32"}, shape=v.shape)
    ints = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
    if v.dtype in ints and dtype in ints:
        return v.with_(dtype=dtype)  # porter holds integers as I32
    if v.dtype in ints and dtype in _FLOATS:
        if v.meta.get("offset"):  # positions + c
            c = v.meta["offset"]
            v = v.with_(meta={})
            return scale(lw, lw.emit("cast", [lw.contiguous(v)], {"type": "f32"}, shape=v.shape), 1.0, float(c))
        return lw.emit("cast", [lw.contiguous(v)], {"type": "f32"}, shape=v.shape)
    raise Gap(str(node.target), f"cast from {v.dtype} to {dtype} on the data path")


# -- products -----------------------------------------------------------------------------------
@lowers("aten.linear.default")
def linear(lw, node):
    """``mul_mat(W, x)`` (+ ``add`` of the bias): ggml's product computes x @ W.T with W as stored"""
    x = _float_val(lw.val(node.args[0]), "linear")
    w = lw.val(node.args[1])
    bias = lw.val(_arg(node, 2, "bias"))
    x = lw.rows(lw.plain(x))
    if x.perm is not None:
        x = lw.contiguous(x)
    out_shape = tuple(x.shape[:-1]) + (w.shape[0],)
    y = lw.emit("mul_mat", [lw.contiguous(w) if w.lazy else w, x], shape=out_shape, role="mul_mat")
    if bias is not None:
        y = binary(lw, "add", y, bias)
    return y


def matmul_vals(lw, a: Val, b: Val) -> Val:
    """torch ``a @ b`` for 2-D..4-D operands: ``mul_mat(b^T, a)`` (ggml broadcasts the batch
    dimensions of its first operand over the second's)."""
    a, b = _float_val(a, "matmul"), _float_val(b, "matmul")
    a, b = patterns.attention_products(lw, a, b)
    if b.heads is not None and b.heads[1] == b.rank - 3:
        # grouped-query heads: ggml's product broadcasts the shared heads itself
        src = b.heads[0]
        bt = lw.permute(src, list(range(src.rank - 2)) + [src.rank - 1, src.rank - 2])
    else:
        bt = lw.permute(lw.plain(b), list(range(b.rank - 2)) + [b.rank - 1, b.rank - 2])
    bt = lw.contiguous(bt)
    a = lw.plain(a)
    if a.perm is not None and a.perm[0] != 0:
        a = lw.contiguous(a)
    batch = _product_batch(a.shape[:-2], b.shape[:-2])
    out_shape = tuple(batch) + (a.shape[-2], b.shape[-1])
    if len(a.shape) < len(out_shape):
        a = lw.reshape(a, (1,) * (len(out_shape) - len(a.shape)) + tuple(a.shape))
    return lw.emit("mul_mat", [bt, a], shape=out_shape, role="mul_mat")


def _product_batch(a, b) -> tuple:
    """Batch dimensions of a product: ggml broadcasts the right operand's batch dimensions over the
    left's when they divide them (grouped-query heads)."""
    a, b = list(a), list(b)
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif isinstance(x, int) and isinstance(y, int) and x % y == 0:
            out.append(x)
        else:
            raise Gap("matmul", f"batch dimensions {a} and {b} do not broadcast in ggml's product")
    return tuple(out)


@lowers("aten.bmm.default", "aten.matmul.default", "aten.mm.default")
def matmul(lw, node):
    """``mul_mat`` of the transposed right operand and the left one"""
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    if a.meta.get("experts") is not None or b.meta.get("experts") is not None:
        return patterns.expert_product(lw, a, b, node)
    if a.rank == 1 or b.rank == 1:
        raise Gap(str(node.target), "matrix-vector products")
    return matmul_vals(lw, a, b)


@lowers("aten.addmm.default")
def addmm(lw, node):
    """``mul_mat`` plus the bias (Conv1D-style weights [in, out] are transposed each pass)"""
    bias, a, b = lw.val(node.args[0]), lw.val(node.args[1]), lw.val(node.args[2])
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    y = matmul_vals(lw, a, b)
    if alpha != 1:
        y = scale(lw, y, alpha)
    if beta != 1:
        bias = binary(lw, "mul", bias, beta)
    return binary(lw, "add", y, bias)


@lowers("aten.baddbmm.default")
def baddbmm(lw, node):
    """``mul_mat`` scaled by alpha plus beta times the input (nothing for a zeros input; an ALiBi
    bias as input is porter's runtime ``kq_mask_alibi``)"""
    a, b = lw.val(node.args[1]), lw.val(node.args[2])
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    y = matmul_vals(lw, a, b)
    if alpha != 1:
        y = scale(lw, y, alpha)
    if beta == 0 or _is_zeros(node.args[0]):
        return y
    if beta == 1:
        biased = patterns.alibi_bias(lw, node.args[0], y, node)
        if biased is not None:
            return biased
    inp = lw.val(node.args[0])
    return binary(lw, "add", y, binary(lw, "mul", inp, beta) if beta != 1 else inp)


def _is_zeros(x) -> bool:
    """An fx node that is zeros by construction (whatever the sequence length)."""
    target = str(getattr(x, "target", ""))
    if target in ("aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default"):
        return True
    return target in ("aten.full.default", "aten.new_full.default") and x.args[-1] == 0


@lowers("aten.embedding.default")
def embedding(lw, node):
    """``get_rows`` of the table by the token ids (or by the positions, for learned position
    embeddings; or by an element-wise function of the ids, tabulated over the vocabulary)"""
    w = lw.val(node.args[0])
    ids = patterns.positions_from_tokens(lw, node.args[1]) or patterns.remapped_ids(lw, node.args[1]) \
        or lw.val(node.args[1])
    if isinstance(ids, Val) and ids.meta.get("fill") is not None:
        # one row for every position (token types of a single segment): a broadcast row
        c = int(ids.meta["fill"])
        row = lw.emit("slice", [w], {"dim": 1, "start": c, "length": 1}, shape=(1, w.shape[1]), kind="weight",
                      dense=False)
        shape = tuple(ids.shape) + (w.shape[1],)
        return Val(None, shape, F32, kind="weight", expand=lw.reshape(lw.contiguous(row), (1,) * len(ids.shape) + (w.shape[1],)))
    if not isinstance(ids, Val) or ids.tensor not in ("tokens", "positions") and not ids.meta.get("rows_of") \
            and not ids.meta.get("token_map"):
        raise Gap("aten.embedding.default", "embedding looked up by something other than token ids or positions")
    table = w
    offset = ids.meta.get("offset", 0)
    if offset:
        rows = w.shape[0] - offset
        table = lw.emit("slice", [w], {"dim": 1, "start": int(offset), "length": int(rows)},
                        shape=(rows, w.shape[1]), kind="weight", dense=False)
    out_shape = tuple(ids.shape) + (w.shape[1],)
    flat = lw.emit("get_rows", [table, Val(ids.tensor, ids.shape, torch.int32)], shape=(numel(ids.shape), w.shape[1]))
    return flat.with_(shape=out_shape) if len(out_shape) <= 4 else lw.reshape(flat, out_shape)


# -- normalisation ------------------------------------------------------------------------------
@lowers("aten.layer_norm.default")
def layer_norm(lw, node):
    """``norm`` over the last dimension, then ``mul`` by the weight and ``add`` of the bias"""
    x = _float_val(lw.val(node.args[0]), "layer_norm")
    shape = list(node.args[1])
    w, b = lw.val(_arg(node, 2, "weight")), lw.val(_arg(node, 3, "bias"))
    eps = float(_arg(node, 4, "eps", 1e-5))
    n = len(shape)
    x = lw.contiguous(x)
    flat = x
    if n > 1:
        flat = lw.reshape(x, tuple(x.shape[:-n]) + (numel(x.shape[-n:]),))
    y = lw.emit("norm", [flat], {"eps": eps}, shape=flat.shape)
    if n > 1:
        y = lw.reshape(y, x.shape)
    if w is not None:
        y = binary(lw, "mul", y, w)
    if b is not None:
        y = binary(lw, "add", y, b)
    return y


@lowers("aten.rms_norm.default")
def rms_norm(lw, node):
    """``rms_norm`` over the last dimension, then ``mul`` by the weight"""
    x = _float_val(lw.val(node.args[0]), "rms_norm")
    w = lw.val(_arg(node, 2, "weight"))
    eps = _arg(node, 3, "eps")
    eps = float(eps) if eps is not None else float(torch.finfo(torch.float32).eps)
    if len(node.args[1]) != 1:
        raise Gap("aten.rms_norm.default", "RMS norm over more than the last dimension")
    y = lw.emit("rms_norm", [lw.contiguous(x)], {"eps": eps}, shape=x.shape)
    return binary(lw, "mul", y, w) if w is not None else y


# -- unary --------------------------------------------------------------------------------------
_UNARY = {
    "aten.silu.default": "silu", "aten.relu.default": "relu", "aten.sigmoid.default": "sigmoid",
    "aten.tanh.default": "tanh", "aten.exp.default": "exp", "aten.log.default": "log", "aten.abs.default": "abs",
    "aten.neg.default": "neg", "aten.sqrt.default": "sqrt", "aten.sin.default": "sin", "aten.cos.default": "cos",
    "aten.reciprocal.default": "recip", "aten.softplus.default": "softplus", "aten.elu.default": "elu",
    "aten.square.default": "sqr", "aten.expm1.default": "expm1", "aten.floor.default": "floor",
    "aten.ceil.default": "ceil", "aten.trunc.default": "trunc",
}


@lowers(*_UNARY)
def unary(lw, node):
    """the op of the same name (``neg``, ``exp``, ``silu``, ``sqrt``...; ``reciprocal`` is ``recip``)"""
    v = lw.val(node.args[0])
    s = _scalar(v)
    if s is not None:
        return Val(None, (), F32, scalar=_python_unary(str(node.target), s))
    op = _UNARY[str(node.target)]
    if op == "softplus" and (node.args[1:] or node.kwargs) and (_arg(node, 1, "beta", 1) != 1 or _arg(node, 2, "threshold", 20) != 20):
        raise Gap("aten.softplus.default", "softplus with beta or threshold other than the defaults")
    if op == "elu" and len(node.args) > 1 and node.args[1] != 1:
        raise Gap("aten.elu.default", "elu with alpha other than 1")
    return elementwise(lw, v, op)


def _python_unary(target: str, s: float) -> float:
    fns = {"aten.exp.default": math.exp, "aten.log.default": math.log, "aten.abs.default": abs,
           "aten.neg.default": operator.neg, "aten.sqrt.default": math.sqrt, "aten.sin.default": math.sin,
           "aten.cos.default": math.cos, "aten.reciprocal.default": lambda x: 1.0 / x,
           "aten.tanh.default": math.tanh, "aten.sigmoid.default": lambda x: 1 / (1 + math.exp(-x))}
    if target not in fns:
        raise Gap(target, "on a constant")
    return fns[target](s)


@lowers("aten.log_sigmoid_forward.default", "aten.log_sigmoid.default")
def log_sigmoid(lw, node):
    """``-softplus(-x)``"""
    v = lw.val(node.args[0])
    out = scale(lw, elementwise(lw, scale(lw, v, -1.0), "softplus"), -1.0)
    if str(node.target) == "aten.log_sigmoid_forward.default":
        return Val(None, (), None, items=[out, Gap("log_sigmoid", "its buffer output")])
    return out


@lowers("aten.log1p.default")
def log1p(lw, node):
    """``log(1 + x)``"""
    v = lw.val(node.args[0])
    if _scalar(v) is not None:
        return Val(None, (), F32, scalar=math.log1p(_scalar(v)))
    return elementwise(lw, scale(lw, v, 1.0, 1.0), "log")


@lowers("aten.rsqrt.default")
def rsqrt(lw, node):
    """``recip(sqrt(x))`` (the RMS-norm pattern, tried by ``mul``, usually absorbs it)"""
    v = lw.val(node.args[0])
    s = _scalar(v)
    if s is not None:
        return Val(None, (), F32, scalar=1.0 / math.sqrt(s))
    return elementwise(lw, elementwise(lw, v, "sqrt"), "recip")


@lowers("aten.gelu.default")
def gelu(lw, node):
    """``gelu_erf`` (exact), or ``gelu_tanh`` for ``approximate="tanh"``"""
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return elementwise(lw, lw.val(node.args[0]), "gelu_tanh" if approx == "tanh" else "gelu_erf")


@lowers("aten.pow.Tensor_Scalar")
def pow_scalar(lw, node):
    """``sqr`` for 2, ``sqrt`` for 0.5, ``recip`` of those for -2 / -0.5, ``x * sqr(x)`` for 3"""
    v, p = lw.val(node.args[0]), float(node.args[1])
    s = _scalar(v)
    if s is not None:
        return Val(None, (), F32, scalar=s ** p)
    if p == 1:
        return v
    if p == 2:
        return elementwise(lw, v, "sqr")
    if p == 0.5:
        return elementwise(lw, v, "sqrt")
    if p == -0.5:
        return elementwise(lw, elementwise(lw, v, "sqrt"), "recip")
    if p == -1:
        return elementwise(lw, v, "recip")
    if p == -2:
        return elementwise(lw, elementwise(lw, v, "sqr"), "recip")
    if p == 3:
        return binary(lw, "mul", elementwise(lw, v, "sqr"), v)
    raise Gap("aten.pow.Tensor_Scalar", f"power {p}")


@lowers("aten.pow.Scalar")
def pow_scalar_base(lw, node):
    """``exp(x * log(base))``"""
    base, v = float(node.args[0]), lw.val(node.args[1])
    if _scalar(v) is not None:
        return Val(None, (), F32, scalar=base ** _scalar(v))
    return elementwise(lw, scale(lw, v, math.log(base)), "exp")


@lowers("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default", "aten.hardtanh.default")
def clamp(lw, node):
    """``clamp`` (an open side is +-3.4e38)"""
    v = lw.val(node.args[0])
    target = str(node.target)
    if target == "aten.clamp_min.default":
        lo, hi = node.args[1], None
    elif target == "aten.clamp_max.default":
        lo, hi = None, node.args[1]
    elif target == "aten.hardtanh.default":
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    for bound in (lo, hi):
        if bound is not None and not isinstance(bound, (int, float)):
            raise Gap(target, "clamp to tensor bounds")
    big = float(torch.finfo(torch.float32).max)
    return elementwise(lw, v, "clamp", {"min": float(lo) if lo is not None else -big,
                                        "max": float(hi) if hi is not None else big})


# -- elementwise binary -------------------------------------------------------------------------
@lowers("aten.add.Tensor", "aten.add.Scalar")
def add(lw, node):
    """``add`` (``scale`` with a bias for a number; ``alpha`` scales the second operand); an ALiBi
    bias (per head, linear in the key position) added to attention scores is porter's runtime
    ``kq_mask_alibi``"""
    match = patterns.try_rope(lw, node)
    if match is not None:
        return match
    alpha = node.kwargs.get("alpha", 1)
    if alpha == 1 and str(node.target) == "aten.add.Tensor":
        for scores, bias in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if patterns._node(scores) is not None and lw.deps.get(scores.name) == "data" \
                    and lw.deps.get(getattr(bias, "name", None)) == "aux":
                match = patterns.alibi_bias(lw, bias, lw.val(scores), node)
                if match is not None:
                    return match
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    if alpha != 1:
        b = binary(lw, "mul", b, alpha)
    return binary(lw, "add", a, b)


@lowers("aten.sub.Tensor", "aten.sub.Scalar")
def sub(lw, node):
    """``sub`` (``scale`` with a bias for a number)"""
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        b = binary(lw, "mul", b, alpha)
    return binary(lw, "sub", a, b)


@lowers("aten.rsub.Scalar", "aten.rsub.Tensor")
def rsub(lw, node):
    """``b - a``"""
    return binary(lw, "sub", lw.val(node.args[1]), lw.val(node.args[0]))


@lowers("aten.mul.Tensor", "aten.mul.Scalar", "aten.multiply.Tensor")
def mul(lw, node):
    """``mul`` (``scale`` for a number); the RMS-norm pattern ``x * rsqrt(mean(x^2) + eps)`` is
    ``rms_norm``"""
    match = patterns.try_rms_norm(lw, node)
    if match is not None:
        return match
    return binary(lw, "mul", lw.val(node.args[0]), lw.val(node.args[1]))


@lowers("aten.div.Tensor", "aten.div.Scalar")
def div(lw, node):
    """``div`` (``scale`` for a number)"""
    if node.kwargs.get("rounding_mode"):
        raise Gap("aten.div.Tensor_mode", "integer division on the data path")
    match = patterns.try_rms_norm(lw, node)
    if match is not None:
        return match
    return binary(lw, "div", lw.val(node.args[0]), lw.val(node.args[1]))


# -- reductions ---------------------------------------------------------------------------------
def _reduce_last(lw, v: Val, dim: int, keepdim: bool, mean: bool) -> Val:
    v = _float_val(v, "sum")
    dim = dim % v.rank
    n = v.shape[dim]
    if dim != v.rank - 1:
        order = [d for d in range(v.rank) if d != dim] + [dim]
        v = lw.permute(v, order)
    c = lw.contiguous(v)
    kept = tuple(c.shape[:-1]) + (1,)
    out = lw.emit("sum_rows", [c], shape=kept)
    if mean:
        if is_sym(n):
            raise Gap("aten.mean.dim", "mean over the sequence")
        out = scale(lw, out, 1.0 / int(n))
    if dim != v.rank - 1:
        back = list(range(len(kept)))
        # the reduced axis sits last; move it back to `dim`
        back = back[:dim] + [len(kept) - 1] + back[dim:-1]
        out = lw.permute(out, back)
    if not keepdim:
        out = lw.reshape(out, tuple(s for i, s in enumerate(out.shape) if i != dim))
    return out


def _reduce(lw, node, mean: bool):
    return _reduce_val(lw, lw.val(node.args[0]), _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)), mean)


def _reduce_val(lw, v: Val, dims, keepdim: bool, mean: bool) -> Val:
    if dims is None or dims == []:
        dims = list(range(v.rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = sorted({d % v.rank for d in dims}, reverse=True)
    out = v
    for d in dims:
        out = _reduce_last(lw, out, d, True, mean)
    if not keepdim:
        out = lw.reshape(out, tuple(s for i, s in enumerate(out.shape) if i not in dims))
    return out


@lowers("aten.sum.dim_IntList")
def sum_dim(lw, node):
    """``sum_rows`` (after a permute when the dimension is not the last)"""
    return _reduce(lw, node, mean=False)


@lowers("aten.var.correction", "aten.var.dim", "aten.std.correction", "aten.std.dim")
def var_std(lw, node):
    """``(x - mean)^2`` summed (``sum_rows``) and scaled by 1/(n - correction); ``sqrt`` for std"""
    v = _float_val(lw.val(node.args[0]), "var")
    dims = _arg(node, 1, "dim")
    keepdim = bool(node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3 else False))
    if str(node.target).endswith(".dim"):
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        correction = 1 if unbiased else 0
    else:
        correction = node.kwargs.get("correction", node.args[2] if len(node.args) > 2 else None)
        correction = 1 if correction is None else correction
    rank = v.rank
    reduced = list(range(rank)) if dims is None or dims == [] else [d % rank for d in ([dims] if isinstance(dims, int) else dims)]
    n = numel([v.shape[d] for d in reduced])
    if not isinstance(n, int):
        raise Gap(str(node.target), "variance over the sequence")
    centred = binary(lw, "sub", v, _reduce_val(lw, v, reduced, True, mean=True))
    out = scale(lw, _reduce_val(lw, binary(lw, "mul", centred, centred), reduced, keepdim, mean=False),
                1.0 / (n - correction) if n > correction else float("inf"))
    return elementwise(lw, out, "sqrt") if ".std." in str(node.target) else out


@lowers("aten.linalg_vector_norm.default")
def vector_norm(lw, node):
    """the 2-norm (``sqrt`` of the ``sum_rows`` of ``sqr``), the 1-norm (of ``abs``); other orders
    are a gap"""
    v = _float_val(lw.val(node.args[0]), "linalg_vector_norm")
    order = _arg(node, 1, "ord", 2)
    if _arg(node, 4, "dtype") not in (None, torch.float32):
        raise Gap("aten.linalg_vector_norm.default", "a norm computed in another dtype", node)
    dims, keepdim = _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    if order == 2:
        return elementwise(lw, _reduce_val(lw, elementwise(lw, v, "sqr"), dims, keepdim, mean=False), "sqrt")
    if order == 1:
        return _reduce_val(lw, elementwise(lw, v, "abs"), dims, keepdim, mean=False)
    raise Gap("aten.linalg_vector_norm.default", f"a vector norm of order {order}", node)


@lowers("aten.mean.dim")
def mean_dim(lw, node):
    """``sum_rows`` then ``scale`` by 1/n"""
    return _reduce(lw, node, mean=True)


def max_last(lw, v: Val) -> tuple[Val, Val]:
    """(values, I32 indices) of the maximum over the last dimension, keepdim: ``argmax`` of the
    rows, then ``get_rows`` of the row elements (ggml has no max reduction)."""
    v = lw.contiguous(_float_val(v, "max"))
    n = v.shape[-1]
    rows = numel(v.shape[:-1])
    flat = lw.reshape(v, (rows, n))
    ids = lw.emit("argmax", [flat], shape=(rows,), dtype=torch.int32, role="argmax")
    col = lw.reshape(flat, (rows, n, 1))
    got = lw.emit("get_rows", [col, lw.reshape(ids, (rows, 1))], shape=(rows, 1, 1), role="max")
    keep = tuple(v.shape[:-1]) + (1,)
    return lw.reshape(got, keep), lw.reshape(ids, keep).with_(dtype=torch.int32)


def _to_last(lw, v: Val, dim: int) -> tuple[Val, list]:
    """``v`` with ``dim`` moved last, and the permutation that puts it back."""
    dim = dim % v.rank
    if dim == v.rank - 1:
        return v, list(range(v.rank))
    order = [d for d in range(v.rank) if d != dim] + [dim]
    return lw.permute(v, order), [order.index(d) for d in range(v.rank)]


@lowers("aten.amax.default", "aten.max.dim")
def amax(lw, node):
    """the maximum over one dimension: ``argmax`` + ``get_rows`` (``max.dim`` also gives the indices)"""
    v = lw.val(node.args[0])
    dims = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            raise Gap(str(node.target), "a maximum over several dimensions")
        dims = dims[0]
    moved, back = _to_last(lw, v, dims)
    values, ids = max_last(lw, moved)
    values, ids = lw.permute(values, back), lw.permute(ids, back)
    if not keepdim:
        shape = tuple(s for i, s in enumerate(v.shape) if i != dims % v.rank)
        values, ids = lw.reshape(values, shape), lw.reshape(ids, shape)
    if str(node.target) == "aten.max.dim":
        return Val(None, (), None, items=[values, ids])
    return values


@lowers("aten.logsumexp.default")
def logsumexp(lw, node):
    """``m + log(sum(exp(x - m)))`` with m the maximum (``argmax`` + ``get_rows``)"""
    v = lw.val(node.args[0])
    dims = node.args[1]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            raise Gap("aten.logsumexp.default", "over several dimensions")
        dims = dims[0]
    moved, back = _to_last(lw, v, dims)
    m, _ = max_last(lw, moved)
    shifted = binary(lw, "sub", moved, m)
    total = _reduce_last(lw, elementwise(lw, shifted, "exp"), moved.rank - 1, True, False)
    out = lw.permute(binary(lw, "add", elementwise(lw, total, "log"), m), back)
    if not keepdim:
        out = lw.reshape(out, tuple(s for i, s in enumerate(v.shape) if i != dims % v.rank))
    return out


@lowers("aten.softmax.int", "aten._softmax.default")
def softmax(lw, node):
    """``soft_max`` over the last dimension (after a permute for another one); the eager
    attention pattern ``softmax(q k^T * s + mask) v`` keeps its mask from porter's runtime"""
    v = _float_val(lw.val(node.args[0]), "softmax")
    dim = node.args[1] % v.rank
    if dim != v.rank - 1:
        order = [d for d in range(v.rank) if d != dim] + [dim]
        y = lw.emit("soft_max", [lw.contiguous(lw.permute(v, order))], shape=tuple(v.shape[d] for d in order))
        inv = [order.index(d) for d in range(v.rank)]
        return lw.permute(y, inv)
    return lw.emit("soft_max", [lw.contiguous(v)], shape=v.shape)


@lowers("aten.cumsum.default")
def cumsum(lw, node):
    """``cumsum`` along the last dimension"""
    v = _float_val(lw.val(node.args[0]), "cumsum")
    dim = node.args[1] % v.rank
    if dim != v.rank - 1:
        raise Gap("aten.cumsum.default", "running sum along another dimension than the last")
    return lw.emit("cumsum", [lw.contiguous(v)], shape=v.shape)


# -- layout -------------------------------------------------------------------------------------
@lowers("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def view(lw, node):
    """``reshape`` (after a ``cont`` when the source is a permuted view); grouped-query
    ``repeat_kv`` (unsqueeze, expand, reshape) stays a broadcast ggml does by itself"""
    match = patterns.try_repeat_kv(lw, node)
    if match is not None:
        return match
    v = lw.val(node.args[0])
    shape = _view_shape(lw, node, v)
    return lw.reshape(v, shape)


def _view_shape(lw, node, v: Val) -> tuple:
    """The target shape of a view, its sequence-length dimensions labelled like the source's
    (n_tokens, n_kv or n_out, in order)."""
    raw = [lw.size(d) for d in node.args[1]]
    src_labels = [d for d in v.shape if is_sym(d)]
    out = []
    k = 0
    for d in raw:
        if is_sym(d):
            if k < len(src_labels) and _same_structure(d, src_labels[k]):
                out.append(src_labels[k])
            else:
                out.append(_relabel(d, src_labels[k] if k < len(src_labels) else None))
            k += 1
        else:
            out.append(d)
    if -1 in out:
        known = numel([d for d in out if d != -1])
        total = numel(v.shape)
        import sympy

        missing = sympy.simplify(sympy.sympify(total) / sympy.sympify(known))
        out[out.index(-1)] = int(missing) if missing.is_Integer else missing
    return tuple(out)


def _same_structure(d, label) -> bool:
    from porter.traced.values import T

    return d == label or (hasattr(d, "subs") and d.subs(T, 0) == 0 and label.free_symbols and
                          d.subs(T, 1) == label.subs({s: 1 for s in label.free_symbols}))


def _relabel(d, label):
    """Replace n_tokens in ``d`` by the runtime symbol of the source dimension ``label``."""
    from porter.traced.values import T

    if label is None or not hasattr(d, "subs"):
        return d
    syms = [s for s in label.free_symbols]
    return d.subs(T, syms[0]) if len(syms) == 1 else d


@lowers("aten.flatten.using_ints")
def flatten(lw, node):
    """``reshape``"""
    v = lw.val(node.args[0])
    start = _arg(node, 1, "start_dim", 0) % max(v.rank, 1)
    end = _arg(node, 2, "end_dim", -1) % max(v.rank, 1)
    shape = tuple(v.shape[:start]) + (numel(v.shape[start:end + 1]),) + tuple(v.shape[end + 1:])
    return lw.reshape(v, shape)


@lowers("aten.unsqueeze.default")
def unsqueeze(lw, node):
    """a ``reshape`` (a view when the source is contiguous)"""
    v = lw.val(node.args[0])
    if _scalar(v) is not None:
        return v
    dim = node.args[1] % (v.rank + 1)
    shape = tuple(v.shape[:dim]) + (1,) + tuple(v.shape[dim:])
    return _reshape_view(lw, v, shape)


@lowers("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def squeeze(lw, node):
    """a ``reshape`` dropping size-one dimensions"""
    v = lw.val(node.args[0])
    if _scalar(v) is not None:
        return v
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, d in enumerate(v.shape) if d == 1]
    if isinstance(dims, int):
        dims = [dims]
    dims = {d % v.rank for d in dims if v.shape[d % v.rank] == 1}
    return _reshape_view(lw, v, tuple(d for i, d in enumerate(v.shape) if i not in dims))


def _reshape_view(lw, v: Val, shape) -> Val:
    """Add or drop size-one dimensions (a view of a contiguous tensor; a broadcast stays lazy)."""
    if v.expand is not None and len(shape) >= v.rank:
        src = v.expand
        src_shape = (1,) * (v.rank - src.rank) + tuple(src.shape)
        src = lw.reshape(lw.plain(src), src_shape) if src_shape != tuple(src.shape) else src
        grown = _insert_ones(src.shape, v.shape, shape)
        return Val(None, tuple(shape), v.dtype, kind=v.kind, expand=lw.reshape(lw.plain(src), grown))
    return lw.reshape(lw.plain(v), shape)


def _insert_ones(src_shape, old, new):
    """Apply to ``src_shape`` (broadcastable to ``old``, same rank) the size-one insertions and
    removals that turn ``old`` into ``new``."""
    out, i = [], 0
    for d in new:
        if i < len(old) and d == old[i]:
            out.append(src_shape[i])
            i += 1
        elif d == 1:
            out.append(1)
        else:
            while i < len(old) and old[i] == 1:
                i += 1
            out.append(src_shape[i])
            i += 1
    return tuple(out)


@lowers("aten.permute.default")
def permute(lw, node):
    """a lazy ``permute`` (a view; two of them may cancel)"""
    return lw.permute(lw.val(node.args[0]), list(node.args[1]))


@lowers("aten.transpose.int")
def transpose(lw, node):
    """a lazy ``permute`` swapping two dimensions"""
    v = lw.val(node.args[0])
    a, b = node.args[1] % v.rank, node.args[2] % v.rank
    dims = list(range(v.rank))
    dims[a], dims[b] = dims[b], dims[a]
    return lw.permute(v, dims)


@lowers("aten.t.default")
def t(lw, node):
    """a lazy ``permute`` of a matrix"""
    v = lw.val(node.args[0])
    return lw.permute(v, [1, 0]) if v.rank == 2 else v


@lowers("aten.expand.default")
def expand(lw, node):
    """a lazy broadcast (ggml's binary ops broadcast their second operand; elsewhere ``repeat``)"""
    v = lw.val(node.args[0])
    sizes = [lw.size(d) for d in node.args[1]]
    if _scalar(v) is not None:
        return v
    src = list(v.shape)
    src = [1] * (len(sizes) - len(src)) + src
    out = tuple(s if (isinstance(n, int) and n == -1) else n for s, n in zip(src, sizes))
    out = tuple(s if (is_sym(s) and is_sym(n)) else n for s, n in zip(src, out))
    if tuple(out) == tuple(v.shape):
        return v
    return Val(None, out, v.dtype, kind=v.kind, expand=v)


@lowers("aten.slice.Tensor")
def slice_(lw, node):
    """``slice`` along the ggml axis of the dimension (a view)"""
    v = lw.plain(lw.val(node.args[0]))
    dim = _arg(node, 1, "dim", 0) % v.rank
    n = v.shape[dim]
    start, end, step = _arg(node, 2, "start", 0), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    start = 0 if start is None else lw.size(start)
    end = n if end is None else lw.size(end)
    if isinstance(end, int) and end >= 2**62:
        end = n
    if _negative(start):  # counted from the end, as python does (x[..., -n_tokens:])
        start = _simplest(n + start)
    if _negative(end):
        end = _simplest(n + end)
    if isinstance(end, int) and isinstance(n, int):
        end = min(end, n)
    if start == 0 and end == n and step == 1:
        return v
    whole = lw.val(node.args[0])
    if step == 1 and whole.meta.get("concat") and whole.meta["concat"][0] == dim:
        for p_start, p_len, piece in whole.meta["concat"][1]:
            if p_start == start and p_start + p_len == end:
                return piece  # a slice that is exactly one concatenated piece
    if is_sym(start) or (is_sym(end) and end != n and step != 1):
        raise Gap("aten.slice.Tensor", "a window whose start depends on the sequence length")
    length = (end - start + step - 1) // step if not is_sym(end) else end - start
    shape = list(v.shape)
    shape[dim] = length
    axis = lw.axis(v, dim)
    if step > 1 and axis == 0 and v.perm is not None:
        v = lw.contiguous(v)
    base = lw.tensor(v)
    return lw.emit("slice", [base], {"dim": axis, "start": start, "length": length, **({"step": step} if step > 1 else {})},
                   shape=tuple(shape), kind=v.kind, dense=False).with_(dense=step > 1 and axis == 0)


def _negative(x) -> bool:
    """A python index below zero; a size expression in the sequence length that is (torch guarded
    its sign when it traced, so one sample length tells)."""
    if isinstance(x, int):
        return x < 0
    return bool(x.subs({s: 13 for s in x.free_symbols}) < 0)


def _simplest(x):
    if isinstance(x, int):
        return x
    x = sympy.simplify(x)
    return int(x) if x.is_Integer else x


@lowers("aten.select.int")
def select(lw, node):
    """a length-one ``slice`` and a ``reshape`` dropping the dimension"""
    v = lw.plain(lw.val(node.args[0]))
    dim = node.args[1] % v.rank
    idx = node.args[2]
    n = v.shape[dim]
    if is_sym(idx) or is_sym(n) and idx < 0:
        raise Gap("aten.select.int", "selecting a position that depends on the sequence length")
    idx = idx + n if idx < 0 else idx
    shape = list(v.shape)
    shape[dim] = 1
    base = lw.tensor(v)
    w = lw.emit("slice", [base], {"dim": lw.axis(v, dim), "start": idx, "length": 1}, shape=tuple(shape),
                kind=v.kind, dense=False)
    return lw.reshape(w, tuple(s for i, s in enumerate(shape) if i != dim))


@lowers("aten.split.Tensor", "aten.split_with_sizes.default", "aten.unbind.int", "aten.chunk.default")
def split(lw, node):
    """``slice`` windows (views), one per piece"""
    v = lw.plain(lw.val(node.args[0]))
    target = str(node.target)
    dim = (_arg(node, 2, "dim", 0) if target != "aten.unbind.int" else _arg(node, 1, "dim", 0)) % v.rank
    n = v.shape[dim]
    if is_sym(n):
        raise Gap(target, "splitting along the sequence")
    if target == "aten.split_with_sizes.default":
        sizes = list(node.args[1])
    elif target == "aten.unbind.int":
        sizes = [1] * n
    elif target == "aten.chunk.default":
        c = node.args[1]
        step = -(-n // c)
        sizes = [min(step, n - i) for i in range(0, n, step)]
    else:
        s = node.args[1]
        sizes = [min(s, n - i) for i in range(0, n, s)]
    axis = lw.axis(v, dim)
    base = lw.tensor(v)
    items, start = [], 0
    for size in sizes:
        shape = list(v.shape)
        shape[dim] = size
        piece = lw.emit("slice", [base], {"dim": axis, "start": start, "length": size}, shape=tuple(shape),
                        kind=v.kind, dense=False)
        if target == "aten.unbind.int":
            piece = lw.reshape(piece, tuple(x for i, x in enumerate(shape) if i != dim))
        items.append(piece)
        start += size
    return Val(None, (), None, items=items)


@lowers("getitem")
def getitem(lw, node):
    """one piece of a split, or one result of an op returning several"""
    v = lw.val(node.args[0])
    if v.items is None:
        raise Gap("getitem", "indexing a value that is not a tuple")
    item = v.items[node.args[1]]
    if isinstance(item, Gap):
        raise item
    return item


@lowers("aten.cat.default", "aten.concat.default", "aten.concatenate.default")
def cat(lw, node):
    """``concat`` along the ggml axis of the dimension, pairwise"""
    vals = [lw.val(x) for x in node.args[0]]
    vals = [v for v in vals if numel(v.shape) != 0]
    dim = _arg(node, 1, "dim", 0)
    if len(vals) == 1:
        return vals[0]
    return concat_vals(lw, vals, dim % vals[0].rank)


def concat_vals(lw, vals, dim: int) -> Val:
    """``concat`` of values along torch dimension ``dim``, pairwise (the pieces are remembered: a
    later slice that is exactly one of them is that piece)."""
    pieces, start = [], 0
    for v in vals:
        pieces.append((start, v.shape[dim], v))
        start = start + v.shape[dim]
    out = _concat_pairwise(lw, vals, dim)
    out.meta["concat"] = (dim, pieces)
    return out


def _concat_pairwise(lw, vals, dim: int) -> Val:
    out = lw.plain(vals[0])
    for v in vals[1:]:
        v = lw.plain(v)
        shape = list(out.shape)
        shape[dim] = out.shape[dim] + v.shape[dim]
        a, b = lw.rows(out), lw.rows(v)
        out = lw.emit("concat", [a, b], {"dim": lw.axis(out, dim)}, shape=tuple(shape))
    return out


@lowers("aten.stack.default")
def stack(lw, node):
    """``concat`` of the inputs each given a new size-one dimension"""
    vals = [lw.val(x) for x in node.args[0]]
    dim = _arg(node, 1, "dim", 0) % (vals[0].rank + 1)
    grown = [_reshape_view(lw, v, tuple(v.shape[:dim]) + (1,) + tuple(v.shape[dim:])) for v in vals]
    out = grown[0]
    for g in grown[1:]:
        shape = list(out.shape)
        shape[dim] = out.shape[dim] + 1
        out = lw.emit("concat", [lw.rows(out), lw.rows(g)], {"dim": lw.axis(out, dim)}, shape=tuple(shape))
    return out


@lowers("aten.repeat.default")
def repeat(lw, node):
    """``repeat`` (torch's repeat tiles, as ggml's does)"""
    v = lw.plain(lw.val(node.args[0]))
    reps = list(node.args[1])
    src = (1,) * (len(reps) - v.rank) + tuple(v.shape)
    out = tuple(s * r for s, r in zip(src, reps))
    if len(src) > v.rank:
        v = lw.reshape(v, src)
    return lw.emit("repeat", [lw.rows(v)], {"shape": [spec_size(d) for d in ggml_shape(out)]}, shape=out, kind=v.kind)


@lowers("aten.repeat_interleave.self_int")
def repeat_interleave(lw, node):
    """a lazy head repeat (``reshape`` + ``repeat`` + ``reshape`` where it must be materialized)"""
    v = lw.val(node.args[0])
    rep = node.args[1]
    dim = _arg(node, 2, "dim")
    if dim is None or not isinstance(rep, int):
        raise Gap("aten.repeat_interleave.self_int", "repeat_interleave without a dimension or with tensor repeats")
    dim = dim % v.rank
    shape = list(v.shape)
    shape[dim] = shape[dim] * rep
    return Val(None, tuple(shape), v.dtype, kind=v.kind, heads=(v, dim, rep))


@lowers("aten.constant_pad_nd.default")
def constant_pad(lw, node):
    """``pad`` with zeros (other fill values are a gap)"""
    v = lw.val(node.args[0])
    pads = list(node.args[1])
    value = _arg(node, 2, "value", 0)
    if value not in (0, 0.0):
        raise Gap("aten.constant_pad_nd.default", f"padding with {value}")
    if any(p < 0 for p in pads):
        raise Gap("aten.constant_pad_nd.default", "negative padding (cropping)")
    shape = list(v.shape)
    gp = [0] * 8
    for i in range(len(pads) // 2):
        dim = v.rank - 1 - i
        shape[dim] = shape[dim] + pads[2 * i] + pads[2 * i + 1]
        axis = lw.axis(v, dim)
        gp[2 * axis], gp[2 * axis + 1] = pads[2 * i], pads[2 * i + 1]
    return lw.emit("pad", [lw.contiguous(v)], {"pads": gp}, shape=tuple(shape))


@lowers("aten.new_empty.default", "aten.new_zeros.default", "aten.new_ones.default", "aten.new_full.default",
        "aten.empty.memory_format", "aten.zeros.default", "aten.ones.default", "aten.full.default")
def new_filled(lw, node):
    """a constant broadcast to the shape (kept lazy: ggml broadcasts it, or ``repeat``); an empty
    tensor is zeros"""
    target = str(node.target)
    if target.startswith("aten.new_"):
        sizes, rest = node.args[1], node.args[2:]
    else:
        sizes, rest = node.args[0], node.args[1:]
    shape = tuple(lw.size(d) for d in sizes)
    value = {"aten.new_ones.default": 1.0, "aten.ones.default": 1.0}.get(target, 0.0)
    if target in ("aten.new_full.default", "aten.full.default"):
        value = float(rest[0])
    one = lw.constant(torch.tensor([value], dtype=torch.float32), "fill")
    return Val(None, shape, F32, kind="weight", expand=one.with_(shape=(1,) * len(shape)) if shape else one)


@lowers("aten.copy.default")
def copy(lw, node):
    """the source, broadcast to the destination's shape (the functional form of ``dst.copy_(src)``)"""
    dst, src = lw.val(node.args[0]), lw.val(node.args[1])
    if tuple(src.shape) == tuple(dst.shape):
        return src
    return Val(None, tuple(dst.shape), src.dtype, kind=src.kind, expand=src)


@lowers("aten.scatter.value")
def scatter_value(lw, node):
    """writing ``value`` at indices along a dimension of size one (group-limited expert routing
    with a single group: every row's only slot is written) is a constant; writing it at each row's
    maximum of the same tensor (routers masking the expert already chosen) is ``where(x >= max,
    value, x)`` (ties at the maximum write every tied slot); other scatters are a gap"""
    base = lw.val(node.args[0])
    dim, value = node.args[1] % base.rank, float(node.args[3])
    ids_n = node.args[2]
    ids = lw.val(ids_n)
    source = ids_n.args[0] if getattr(ids_n, "target", None) is operator.getitem and ids_n.args[1] == 1 else None
    if (source is not None and str(getattr(source, "target", "")) == "aten.max.dim" and source.args[0] is node.args[0]
            and source.args[1] % base.rank == dim == base.rank - 1 and ids.shape[dim] == 1):
        x = _float_val(base, "aten.scatter.value")
        return select_where(lw, _compare(lw, "ge", x, max_last(lw, x)[0]), value, x)
    if base.shape[dim] != 1 or ids.shape[dim] < 1:
        raise Gap("aten.scatter.value", "a scatter into more than one slot (group-limited routing with "
                                        "several groups)")
    one = lw.constant(torch.tensor([value], dtype=torch.float32), "scatter")
    return Val(None, tuple(base.shape), F32, kind="weight", expand=one.with_(shape=(1,) * base.rank))


_FILLS = {"aten.full_like.default": None, "aten.zeros_like.default": 0.0, "aten.ones_like.default": 1.0}


@lowers("aten.scatter.src")
def scatter_src(lw, node):
    """the top-k values of x written back at their own indices into a tensor filled with a number
    (routers keeping the chosen experts' scores, the rest -inf or 0): ``where(x >= the k-th
    largest value, x, fill)``, the k-th largest by ``argmax`` of the negated values (ties at the
    k-th value keep every tied slot); other scatters are a gap"""
    base_n, dim, ids_n, src_n = (_arg(node, i, n) for i, n in enumerate(("self", "dim", "index", "src")))
    picked = _topk_outputs(ids_n, src_n)
    fill_target = str(getattr(base_n, "target", ""))
    if picked is None or fill_target not in _FILLS:
        raise Gap("aten.scatter.src", "a scatter other than top-k values back into a filled tensor")
    topk_n, x_n = picked
    x = lw.val(x_n)
    fill = _FILLS[fill_target]
    fill = float(base_n.args[1]) if fill is None else fill
    k_dim = _arg(topk_n, 2, "dim", -1)
    if dim % x.rank != x.rank - 1 or k_dim % x.rank != x.rank - 1 or tuple(lw.meta_shape(base_n)) != tuple(x.shape):
        raise Gap("aten.scatter.src", "a top-k scatter along another dimension than the last")
    values = lw.val(src_n)
    kth = scale(lw, max_last(lw, scale(lw, values, -1.0))[0], -1.0)
    return select_where(lw, _compare(lw, "ge", x, kth), x, fill)


def _topk_outputs(ids_n, src_n):
    """(topk node, its input) when ids_n and src_n are the indices and values of one topk."""
    if not all(getattr(n, "target", None) is operator.getitem for n in (ids_n, src_n)):
        return None
    topk_n = src_n.args[0]
    if ids_n.args[0] is not topk_n or str(getattr(topk_n, "target", "")) != "aten.topk.default" \
            or src_n.args[1] != 0 or ids_n.args[1] != 1:
        return None
    if not (len(topk_n.args) <= 3 or topk_n.args[3]) or topk_n.kwargs.get("largest", True) is False:
        return None
    return topk_n, topk_n.args[0]


@lowers("aten.slice_scatter.default")
def slice_scatter(lw, node):
    """``concat`` of the base's part before the window, the source, and the part after it"""
    base, src = lw.val(node.args[0]), lw.val(node.args[1])
    dim = _arg(node, 2, "dim", 0) % base.rank
    start, end, step = _arg(node, 3, "start", None), _arg(node, 4, "end", None), _arg(node, 5, "step", 1)
    n = base.shape[dim]
    start = 0 if start is None else lw.size(start)
    end = n if end is None or (isinstance(end, int) and end >= 2**62) else lw.size(end)
    if step != 1 or is_sym(start) or is_sym(end) and end != n:
        raise Gap("aten.slice_scatter.default", "a strided window or one placed by the sequence length")
    parts = []
    if start:
        parts.append(_window(lw, base, dim, 0, start))
    parts.append(src if tuple(src.shape) == tuple(base.shape[:dim]) + (end - start,) + tuple(base.shape[dim + 1:])
                 else lw.plain(src))
    if end != n:
        parts.append(_window(lw, base, dim, end, n - end))
    return parts[0] if len(parts) == 1 else concat_vals(lw, parts, dim)


def _window(lw, v: Val, dim: int, start: int, length: int) -> Val:
    if v.meta.get("concat") and v.meta["concat"][0] == dim:
        for p_start, p_len, piece in v.meta["concat"][1]:
            if p_start == start and p_len == length:
                return piece
    v = lw.plain(v)
    shape = list(v.shape)
    shape[dim] = length
    return lw.emit("slice", [lw.tensor(v)], {"dim": lw.axis(v, dim), "start": start, "length": length},
                   shape=tuple(shape), kind=v.kind, dense=False)


@lowers("aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default")
def full_like(lw, node):
    """``fill`` of a tensor of the same shape"""
    v = lw.val(node.args[0])
    target = str(node.target)
    value = {"aten.zeros_like.default": 0.0, "aten.ones_like.default": 1.0}.get(target)
    if value is None:
        value = float(node.args[1])
    return lw.emit("fill", [lw.contiguous(v)], {"value": value}, shape=v.shape)


# -- comparisons and selection: booleans are 0/1 floats -------------------------------------------
BIG = float(torch.finfo(torch.float32).max)


def _bool(v: Val) -> Val:
    return v.with_(dtype=torch.bool)


def ne_zero(lw, v: Val) -> Val:
    return _bool(elementwise(lw, elementwise(lw, v, "abs"), "step"))


def _diff(lw, a, b):
    return binary(lw, "sub", a, b)


def _compare(lw, op: str, a, b) -> Val:
    """a OP b as 0/1: ``step`` (1 where its input is > 0) of a difference."""
    if op == "gt":
        return _bool(elementwise(lw, _diff(lw, a, b), "step"))
    if op == "lt":
        return _bool(elementwise(lw, _diff(lw, b, a), "step"))
    if op == "ge":
        return _bool(scale(lw, elementwise(lw, _diff(lw, b, a), "step"), -1.0, 1.0))
    if op == "le":
        return _bool(scale(lw, elementwise(lw, _diff(lw, a, b), "step"), -1.0, 1.0))
    if op == "ne":
        return ne_zero(lw, _diff(lw, a, b))
    if op == "eq":
        return _bool(scale(lw, ne_zero(lw, _diff(lw, a, b)), -1.0, 1.0))
    raise Gap(op, "comparison")


@lowers("aten.gt.Scalar", "aten.gt.Tensor", "aten.lt.Scalar", "aten.lt.Tensor", "aten.ge.Scalar", "aten.ge.Tensor",
        "aten.le.Scalar", "aten.le.Tensor", "aten.eq.Scalar", "aten.eq.Tensor", "aten.ne.Scalar", "aten.ne.Tensor")
def compare(lw, node):
    """0/1 floats from ``step`` of a difference (``gt``: step(a - b); ``eq``: 1 - step(|a - b|))"""
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    op = str(node.target).split(".")[1]
    if _scalar(a) is not None and _scalar(b) is not None:
        fn = {"gt": operator.gt, "lt": operator.lt, "ge": operator.ge, "le": operator.le, "eq": operator.eq,
              "ne": operator.ne}[op]
        return Val(None, (), torch.bool, scalar=float(fn(_scalar(a), _scalar(b))))
    return _compare(lw, op, a, b)


@lowers("aten.logical_not.default", "aten.bitwise_not.default")
def logical_not(lw, node):
    """``1 - m``"""
    v = lw.val(node.args[0])
    if v.meta.get("mask") is not None:
        return v.with_(meta={"mask": dict(v.meta["mask"], inverted=not v.meta["mask"].get("inverted", False))})
    return _bool(scale(lw, v, -1.0, 1.0))


@lowers("aten.logical_and.default", "aten.bitwise_and.Tensor", "aten.__and__.Tensor", "aten.mul.Tensor_bool")
def logical_and(lw, node):
    """``m1 * m2``"""
    return _bool(binary(lw, "mul", lw.val(node.args[0]), lw.val(node.args[1])))


@lowers("aten.logical_or.default", "aten.bitwise_or.Tensor", "aten.__or__.Tensor")
def logical_or(lw, node):
    """``m1 + m2 - m1 * m2``"""
    a, b = lw.val(node.args[0]), lw.val(node.args[1])
    return _bool(binary(lw, "sub", binary(lw, "add", a, b), binary(lw, "mul", a, b)))


def select_where(lw, c, a, b) -> Val:
    """torch.where(c, a, b) with c a 0/1 float: ``c*a + (1-c)*b``; an infinite (or float32-extreme)
    branch is ``other -/+ (1 or 0)*BIG``, which keeps the other branch exact and never makes 0*inf.
    A traced attention mask choosing between the scores and -inf is porter's runtime mask."""
    from porter.traced import patterns

    sa, sb = _scalar(a), _scalar(b)
    if isinstance(c, Val) and c.meta.get("mask") is not None:
        inv = c.meta["mask"].get("inverted", False)
        keep, fill = (b, sa) if inv else (a, sb)
        if fill is not None and fill <= -BIG / 2:
            mask = patterns.runtime_mask(lw, c.with_(meta={"mask": {k: v for k, v in c.meta["mask"].items()
                                                                      if k != "inverted"}}))
            return binary(lw, "add", keep, mask)
        raise Gap("aten.where.self", "an attention mask selecting something else than -inf")
    if _scalar(c) is not None:
        return a if _scalar(c) else b
    c = _float_val(c, "where")
    if sb is not None and abs(sb) >= BIG / 2:
        return binary(lw, "add", a, binary(lw, "mul", scale(lw, c, -1.0, 1.0), -BIG if sb < 0 else BIG))
    if sa is not None and abs(sa) >= BIG / 2:
        return binary(lw, "add", b, binary(lw, "mul", c, -BIG if sa < 0 else BIG))
    return binary(lw, "add", binary(lw, "mul", c, a), binary(lw, "mul", scale(lw, c, -1.0, 1.0), b))


@lowers("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where(lw, node):
    """``c*a + (1-c)*b`` (see :func:`select_where`)"""
    return select_where(lw, lw.val(node.args[0]), lw.val(node.args[1]), lw.val(node.args[2]))


@lowers("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def masked_fill(lw, node):
    """``where(mask, value, x)``"""
    return select_where(lw, lw.val(node.args[1]), lw.val(node.args[2]), lw.val(node.args[0]))


@lowers("aten.minimum.default", "aten.min.other", "aten.maximum.default", "aten.max.other")
def min_max(lw, node):
    """``clamp`` against a number; ``a - relu(a - b)`` / ``a + relu(b - a)`` between tensors"""
    is_min = str(node.target) in ("aten.minimum.default", "aten.min.other")
    return _min_max(lw, lw.val(node.args[0]), lw.val(node.args[1]), is_min)


@lowers("aten.clamp.Tensor")
def clamp_tensor(lw, node):
    """clamp to tensor bounds: the maximum with the lower bound, then the minimum with the upper
    one (as ``aten.maximum`` / ``aten.minimum``)"""
    out = lw.val(node.args[0])
    lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    if lo is not None:
        out = _min_max(lw, out, lw.val(lo), is_min=False)
    if hi is not None:
        out = _min_max(lw, out, lw.val(hi), is_min=True)
    return out


def _min_max(lw, a, b, is_min: bool):
    sa, sb = _scalar(a), _scalar(b)
    if sa is not None and sb is not None:
        return Val(None, (), F32, scalar=min(sa, sb) if is_min else max(sa, sb))
    if sa is not None:
        a, b, sa, sb = b, a, sb, sa
    if sb is not None:
        return elementwise(lw, a, "clamp", {"min": -BIG, "max": sb} if is_min else {"min": sb, "max": BIG})
    if is_min:
        return binary(lw, "sub", a, elementwise(lw, binary(lw, "sub", a, b), "relu"))
    return binary(lw, "add", a, elementwise(lw, binary(lw, "sub", b, a), "relu"))


@lowers("aten.scaled_dot_product_attention.default")
def sdpa(lw, node):
    """``kv_store`` of keys and values, then ``flash_attn`` with porter's runtime mask"""
    return patterns.attention(lw, node)


@lowers("aten.conv1d.default")
def conv1d(lw, node):
    """a causal depthwise convolution (``groups`` = channels, padding kernel - 1: LFM, state-space
    layers) -> ``state_store`` of the layer's last kernel - 1 inputs + ``ssm_conv``; others are a gap"""
    return patterns.short_conv(lw, node)


@lowers("porter.delta_rule.default")
def delta_rule(lw, node):
    """transformers' gated delta rule kernel (Qwen3-Next, Qwen3.5, OLMo hybrid, Kimi linear
    attention; kept whole in the trace by porter.traced.kernels) -> ``delta_net`` on the layer's
    recurrent memory, after the kernel's l2 norms of q and k and its head repeat"""
    return patterns.delta_rule(lw, node)


@lowers("porter.ssm_scan.default")
def ssm_scan(lw, node):
    """Mamba-2's chunked selective scan kernel (Mamba-2, Bamba, Nemotron-H, Falcon-H1, Zamba2,
    Granite hybrids; kept whole in the trace by porter.traced.kernels) -> ``ssm_scan`` on the
    layer's recurrent state, with the time-step bias before it and the skip term D x after it"""
    return patterns.ssm_scan(lw, node)


@lowers("porter.selective_scan.default")
def selective_scan(lw, node):
    """Mamba's selective scan kernel (Mamba, Falcon-Mamba, Jamba; kept whole in the trace by
    porter.traced.kernels) -> ``ssm_scan`` with one head per channel on the layer's recurrent
    state, the time-step bias before it, the skip term D x and the silu gate after it"""
    return patterns.selective_scan(lw, node)


@lowers("aten.view_as_real.default")
def view_as_real(lw, node):
    """a rotary embedding written with complex numbers (``view_as_real(view_as_complex(x) *
    freqs)``) -> ``rope`` (interleaved pairs); other complex arithmetic is a gap"""
    match = patterns.complex_rope(lw, node)
    if match is None:
        raise Gap("aten.view_as_real.default", "complex numbers other than a rotary embedding of the positions")
    return match


@lowers("aten.view_as_complex.default")
def view_as_complex(lw, node):
    """nothing by itself (porter computes in float32): consumed by the complex rotary rewrite of
    ``aten.view_as_real``"""
    raise Gap("aten.view_as_complex.default", "complex numbers other than a rotary embedding of the positions")


@lowers("aten.topk.default")
def topk(lw, node):
    """``top_k`` (indices) and ``get_rows`` (their values)"""
    return patterns.topk(lw, node)


@lowers("aten.gather.default")
def gather(lw, node):
    """``get_rows`` on the source viewed one element per row (routing weights of the chosen experts)"""
    return patterns.gather(lw, node)


@lowers("aten.index.Tensor")
def index(lw, node):
    """experts' weights indexed by the chosen experts feed ``mul_mat_id`` (the batched_mm experts)"""
    return patterns.index_experts(lw, node)


@lowers("aten.argsort.default", "aten.sort.default")
def argsort(lw, node):
    """``argsort`` along the last dimension"""
    return patterns.argsort(lw, node)


__all__ = ["binary", "elementwise", "matmul_vals", "scale"]
