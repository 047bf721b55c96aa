"""The closed op vocabulary: validated wrappers over ggml operators.

ggml checks its preconditions with ``GGML_ASSERT``, which aborts the whole process. Every
wrapper here checks the same preconditions in Python first and raises :class:`ShapeError`
with a message naming the op, the offending shapes, and what would be valid.

Shapes in this module are ggml's ``ne`` order (innermost dimension first).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

from porter.errors import ShapeError
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Context, ne_of, tensor_name, type_of
from porter.runtime.types import GGMLType

ROPE_NORMAL = 0  # rotate adjacent pairs (x0, x1), (x2, x3) ... (GPT-J / "interleaved")
ROPE_NEOX = 2  # rotate halves (x_i, x_{i + n/2}) (GPT-NeoX / transformers' rotate_half)

_FLOAT = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _desc(t) -> str:
    name = tensor_name(t)
    return f"{name + ' ' if name else ''}{type_of(t).name}{list(ne_of(t))}"


def _fail(op: str, msg: str, *tensors) -> ShapeError:
    shapes = ", ".join(_desc(t) for t in tensors)
    return ShapeError(f"{op}: {msg} (got {shapes})")


def _can_repeat(small, big) -> bool:
    return all(small.ne[i] != 0 and big.ne[i] % small.ne[i] == 0 for i in range(4))


def _require_dense(op: str, *tensors) -> None:
    """ggml's compute kernels (everything but copies and views) need each row's elements adjacent."""
    for t in tensors:
        if t is not None and t.nb[0] != lib.ggml_type_size(t.type):
            raise _fail(op, "needs the elements of each row adjacent in memory; this is a transposed or "
                            "permuted view (cont it first)", t)


def _uniform_rows(t) -> bool:
    """Rows reachable as ``data + i * nb[1]`` (ggml_is_padded_1d): what row-loop kernels assume.
    Unlike ggml_is_contiguous_1 this also checks the strides of size-1 dimensions, which a
    permute can leave arbitrary and some kernels still multiply."""
    return t.nb[0] == lib.ggml_type_size(t.type) and t.nb[2] == t.nb[1] * t.ne[1] and t.nb[3] == t.nb[2] * t.ne[2]


def _packed(t) -> bool:
    """Fully contiguous, strides of size-1 dimensions included."""
    return _uniform_rows(t) and t.nb[1] == lib.ggml_row_size(t.type, t.ne[0])


def _require_packed(op: str, *tensors, what: str = "input") -> None:
    for t in tensors:
        if t is not None and not _packed(t):
            raise _fail(op, f"{what} must be contiguous (cont it first)", t)


def _require_f32(op: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.type != GGMLType.F32:
            raise _fail(op, "expects F32 activations", t)


def _require_weight(op: str, w) -> None:
    """ggml has dot-product kernels for float and block-quantized weights only (others crash)."""
    wt = GGMLType(w.type)
    if wt not in _FLOAT and not (wt.is_quantized and wt.block_size > 1):
        raise _fail(op, f"weights must be F32, F16, BF16 or a quantized type, not {wt.name}", w)


def _require_rows_kept(op: str, a, keeps_dim0: bool) -> None:
    """Blocks of a quantized tensor run along ne[0]: moving that dimension makes no sense (and
    ggml's kernels then read and write out of bounds)."""
    if GGMLType(a.type).block_size > 1 and not keeps_dim0:
        raise _fail(op, "a quantized tensor's blocks run along ne[0]; that dimension must stay first "
                        "(cast it to F32 first)", a)


def _check_conversion(op: str, src, dst_type: GGMLType, dst_contiguous: bool, dst_ne0: int = 0) -> None:
    """The conversions ggml's CPU copy kernels implement (others abort with "not implemented")."""
    src_type = GGMLType(src.type)
    if src_type.block_size > 1 and (src.nb[0] != lib.ggml_type_size(src.type) or src.ne[0] % src_type.block_size):
        raise _fail(op, f"a {src_type.name} source must consist of whole blocks along ne[0]", src)
    if src_type == dst_type:
        return
    if src_type in _FLOAT and dst_type in _FLOAT:
        return
    if {src_type, dst_type} == {GGMLType.F32, GGMLType.I32}:
        return
    if src_type in _FLOAT and dst_type.is_quantized and dst_type.block_size > 1:
        if not _packed(src) or not dst_contiguous:
            raise _fail(op, f"quantizing to {dst_type.name} needs contiguous source and destination (cont it first)", src)
        return
    if src_type.is_quantized and dst_type == GGMLType.F32:
        if not dst_contiguous and dst_ne0 % src_type.block_size:
            raise _fail(op, f"dequantizing {src_type.name} into a strided destination needs its rows to hold "
                            f"whole blocks of {src_type.block_size}", src)
        return
    raise _fail(op, f"ggml's CPU backend cannot convert {src_type.name} to {dst_type.name} "
                    "(float types convert among themselves, to quantized types and F32 <-> I32; "
                    "quantized types convert to F32)", src)


def _strides_for(a, ne: Sequence[int]) -> list[int] | None:
    """Byte strides under which the elements of strided ``a`` read as shape ``ne`` without a
    copy (numpy's rule: each group of old dimensions merged or split must be dense within
    itself), or None. Only for types without blocks, with dense rows."""
    size = lib.ggml_type_size(a.type)
    if lib.ggml_blck_size(a.type) != 1 or a.nb[0] != size:
        return None
    old = [(int(a.ne[i]), int(a.nb[i])) for i in range(4) if a.ne[i] != 1]
    new = [int(n) for n in ne]
    nb = [0] * 4
    oi = ni = 0
    while oi < len(old) and ni < 4:
        if new[ni] == 1:  # a size-1 dimension: any stride; keep ggml's dense convention
            nb[ni] = nb[ni - 1] * new[ni - 1] if ni else size
            ni += 1
            continue
        n_new, n_old, nj, oj = new[ni], old[oi][0], ni + 1, oi + 1
        while n_new != n_old:
            if n_new < n_old:
                if nj == 4:
                    return None
                n_new, nj = n_new * new[nj], nj + 1
            else:
                if oj == len(old):
                    return None
                n_old, oj = n_old * old[oj][0], oj + 1
        if any(old[k + 1][1] != old[k][1] * old[k][0] for k in range(oi, oj - 1)):
            return None  # the old dimensions of this group are not dense within it
        nb[ni] = old[oi][1]
        for k in range(ni + 1, nj):
            nb[k] = nb[k - 1] * new[k - 1]
        oi, ni = oj, nj
    if oi < len(old):
        return None
    for k in range(ni, 4):
        nb[k] = nb[k - 1] * new[k - 1] if k else size
    return nb if nb[0] == size else None


class Ops:
    """Op constructors bound to one graph context."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.c = ctx.ptr
        # Index tensors (get_rows ids, set_rows rows, mul_mat_id expert ids) and the exclusive
        # upper bound of their values, keyed by the address of the tensor holding the data (a
        # view's source). ggml aborts or crashes on an out-of-range index, so whoever feeds
        # data into these tensors must check it first (GraphRunner.compute does).
        self.index_limits: dict[int, tuple[int, str]] = {}

    def _limit_indices(self, ids, bound: int, op: str) -> None:
        root = ids
        while root.view_src != ffi.NULL:
            root = root.view_src
        key = int(ffi.cast("uintptr_t", root))
        previous = self.index_limits.get(key)
        if previous is None or bound < previous[0]:
            self.index_limits[key] = (int(bound), op)

    # -- naming --------------------------------------------------------------------------------
    @staticmethod
    def name(t, name: str):
        lib.ggml_set_name(t, name.encode()[:63])
        return t

    # -- lookups and products ----------------------------------------------------------------------
    def get_rows(self, table, ids):
        """Rows of ``table`` (ne: [n_embd, n_rows, ...]) selected by I32 ``ids`` -> F32."""
        if ids.type != GGMLType.I32:
            raise _fail("get_rows", "row indices must be I32", ids)
        if table.ne[2] != ids.ne[1] or table.ne[3] != ids.ne[2] or ids.ne[3] != 1:
            raise _fail("get_rows", "ids must be [n, table.ne[2], table.ne[3]] for a table [n_embd, n_rows, ne2, ne3]",
                        table, ids)
        _require_dense("get_rows", table, ids)
        self._limit_indices(ids, table.ne[1], "get_rows")
        return lib.ggml_get_rows(self.c, table, ids)

    def mul_mat(self, w, x):
        """``x @ w.T`` in numpy terms: w ne [k, m, ...], x ne [k, n, ...] -> ne [m, n, ...]."""
        if w.ne[0] != x.ne[0]:
            raise _fail("mul_mat", f"inner dimensions differ ({w.ne[0]} vs {x.ne[0]})", w, x)
        if x.ne[2] % w.ne[2] or x.ne[3] % w.ne[3]:
            raise _fail("mul_mat", "batch dimensions of the second operand must be multiples of the first's", w, x)
        if lib.ggml_is_transposed(w):
            raise _fail("mul_mat", "the first operand must not be transposed (cont it first)", w)
        _require_dense("mul_mat", w, x)
        if x.type != GGMLType.F32:
            raise _fail("mul_mat", "the second operand (activations) must be F32", x)
        _require_weight("mul_mat", w)
        return lib.ggml_mul_mat(self.c, w, x)

    def mul_mat_id(self, experts, x, ids):
        """Per-token expert products: experts ne [k, m, n_expert], x ne [k, n_used|1, n_tokens],
        ids I32 ne [n_used, n_tokens] -> ne [m, n_used, n_tokens]."""
        if ids.type != GGMLType.I32:
            raise _fail("mul_mat_id", "expert ids must be I32", ids)
        if experts.ne[0] != x.ne[0]:
            raise _fail("mul_mat_id", "inner dimensions differ", experts, x)
        if experts.ne[3] != 1:
            raise _fail("mul_mat_id", "experts must be [k, m, n_expert] (3 dimensions)", experts)
        if ids.ne[1] != x.ne[2] or ids.ne[0] % x.ne[1] or x.ne[3] != 1 or ids.ne[2] != 1 or ids.ne[3] != 1:
            raise _fail("mul_mat_id", "x must be [k, n_used or 1, n_tokens] for ids [n_used, n_tokens]", x, ids)
        if x.type != GGMLType.F32:
            raise _fail("mul_mat_id", "activations must be F32", x)
        _require_weight("mul_mat_id", experts)
        _require_dense("mul_mat_id", experts, x, ids)
        self._limit_indices(ids, experts.ne[2], "mul_mat_id")
        return lib.ggml_mul_mat_id(self.c, experts, x, ids)

    # -- elementwise binary (b broadcasts into a, numpy-like when the op commutes) -----------------
    def _binary(self, op: str, fn, a, b, commutes: bool):
        if not _can_repeat(b, a):
            if commutes and _can_repeat(a, b):
                a, b = b, a
            else:
                raise _fail(op, "the second operand must broadcast into the first (each dimension divides)", a, b)
        _require_f32(op, a)
        _require_dense(op, a, b)
        if b.type != GGMLType.F32:  # ggml's CPU kernels have no F32 x F16 -> F32 variant (abort)
            raise _fail(op, "the second operand must be F32 too (cast it first)", b)
        return fn(self.c, a, b)

    def add(self, a, b):
        return self._binary("add", lib.ggml_add, a, b, True)

    def sub(self, a, b):
        return self._binary("sub", lib.ggml_sub, a, b, False)

    def mul(self, a, b):
        return self._binary("mul", lib.ggml_mul, a, b, True)

    def div(self, a, b):
        return self._binary("div", lib.ggml_div, a, b, False)

    def scale(self, a, s: float, bias: float = 0.0):
        """``a * s + bias``."""
        _require_f32("scale", a)
        _require_packed("scale", a)  # ggml asserts ggml_is_padded_1d, its kernel ggml_is_contiguous
        if bias:
            return lib.ggml_scale_bias(self.c, a, float(s), float(bias))
        return lib.ggml_scale(self.c, a, float(s))

    # -- normalization ------------------------------------------------------------------------
    def rms_norm(self, a, eps: float):
        _require_f32("rms_norm", a)
        _require_dense("rms_norm", a)
        if not eps >= 0:  # NaN too
            raise ShapeError(f"rms_norm: epsilon must be a non-negative number, got {eps}")
        return lib.ggml_rms_norm(self.c, a, float(eps))

    def norm(self, a, eps: float):
        """Layer normalization over ne[0] without affine parameters."""
        _require_f32("norm", a)
        _require_dense("norm", a)
        if not eps >= 0:  # NaN too
            raise ShapeError(f"norm: epsilon must be a non-negative number, got {eps}")
        return lib.ggml_norm(self.c, a, float(eps))

    def l2_norm(self, a, eps: float):
        _require_f32("l2_norm", a)
        _require_dense("l2_norm", a)
        if not eps >= 0:  # NaN too
            raise ShapeError(f"l2_norm: epsilon must be a non-negative number, got {eps}")
        return lib.ggml_l2_norm(self.c, a, float(eps))

    # -- unary ------------------------------------------------------------------------------------
    def _unary(self, op: str, fn, a):
        _require_f32(op, a)
        _require_dense(op, a)
        if not lib.ggml_is_contiguous_1(a):
            raise _fail(op, "needs rows contiguous in memory (cont it first)", a)
        return fn(self.c, a)

    def silu(self, a):
        return self._unary("silu", lib.ggml_silu, a)

    @staticmethod
    def swiglu_fits(a, b) -> bool:
        """Whether :meth:`swiglu` takes ``a`` and ``b``: F32, one shape, rows reachable as
        ``data + i * nb[1]`` (the GLU kernel's addressing, which a size-1 dimension's stride,
        left arbitrary by a permute, would send elsewhere)."""
        return (a.type == b.type == GGMLType.F32 and all(a.ne[i] == b.ne[i] for i in range(4))
                and _uniform_rows(a) and _uniform_rows(b))

    def swiglu(self, a, b):
        """``silu(a) * b`` in one kernel (ggml's GLU), bit for bit what the two ops give."""
        if not self.swiglu_fits(a, b):
            raise _fail("swiglu", "needs two F32 tensors of one shape with evenly spaced rows", a, b)
        return lib.ggml_swiglu_split(self.c, a, b)

    def glu_halves(self, a):
        """``silu(a[:h]) * a[h:]`` along ne[0] (h = half of it) in one kernel: a gated MLP whose gate
        and up products were computed as one (porter.runtime.fusion)."""
        if a.type != GGMLType.F32 or a.ne[0] % 2 or not lib.ggml_is_contiguous(a):
            raise _fail("glu_halves", "needs a dense F32 tensor with an even ne[0]", a)
        return lib.ggml_swiglu(self.c, a)

    def gelu_erf(self, a):
        """Exact GELU, x * Phi(x)."""
        return self._unary("gelu_erf", lib.ggml_gelu_erf, a)

    def gelu_tanh(self, a):
        """Tanh-approximated GELU, composed from F32 ops (ggml_gelu uses an fp16 table, ~1e-3 off)."""
        x3 = self.mul(self.sqr(a), a)
        inner = self.scale(self.add(a, self.scale(x3, 0.044715)), math.sqrt(2.0 / math.pi))
        return self.mul(a, self.scale(self.tanh(inner), 0.5, 0.5))

    def relu(self, a):
        return self._unary("relu", lib.ggml_relu, a)

    def relu2(self, a):
        """Squared ReLU, ``relu(x)^2`` (exact: both steps are exact in F32)."""
        return self.sqr(self.relu(a))

    def sigmoid(self, a):
        return self._unary("sigmoid", lib.ggml_sigmoid, a)

    def tanh(self, a):
        return self._unary("tanh", lib.ggml_tanh, a)

    def exp(self, a):
        return self._unary("exp", lib.ggml_exp, a)

    def sqr(self, a):
        return self._unary("sqr", lib.ggml_sqr, a)

    def sqrt(self, a):
        return self._unary("sqrt", lib.ggml_sqrt, a)

    def neg(self, a):
        return self._unary("neg", lib.ggml_neg, a)

    def abs(self, a):
        return self._unary("abs", lib.ggml_abs, a)

    def cos(self, a):
        return self._unary("cos", lib.ggml_cos, a)

    def sin(self, a):
        return self._unary("sin", lib.ggml_sin, a)

    def log(self, a):
        return self._unary("log", lib.ggml_log, a)

    def floor(self, a):
        return self._unary("floor", lib.ggml_floor, a)

    def ceil(self, a):
        return self._unary("ceil", lib.ggml_ceil, a)

    def round(self, a):
        """Nearest integer, halves away from zero (C's roundf; torch rounds halves to even)."""
        return self._unary("round", lib.ggml_round, a)

    def trunc(self, a):
        return self._unary("trunc", lib.ggml_trunc, a)

    def expm1(self, a):
        """exp(a) - 1, accurate near 0."""
        return self._unary("expm1", lib.ggml_expm1, a)

    def softplus(self, a):
        return self._unary("softplus", lib.ggml_softplus, a)

    def gelu_quick(self, a):
        """x * sigmoid(1.702 x), composed from F32 ops (ggml_gelu_quick reads an fp16 table, ~4e-3 off)."""
        _require_f32("gelu_quick", a)
        _require_dense("gelu_quick", a)
        x = a if _packed(a) else self.cont(a)
        return self.mul(x, self.sigmoid(self.scale(x, 1.702)))

    def elu(self, a):
        return self._unary("elu", lib.ggml_elu, a)

    def step(self, a):
        """1 where a > 0, else 0."""
        return self._unary("step", lib.ggml_step, a)

    def recip(self, a):
        """1 / a (ggml has no reciprocal: a tensor of ones divided by a)."""
        _require_f32("recip", a)
        _require_dense("recip", a)
        return self.div(self.fill(a, 1.0), a)

    def clamp(self, a, lo: float, hi: float):
        _require_f32("clamp", a)
        _require_dense("clamp", a)
        if not lo <= hi:
            raise ShapeError(f"clamp: min {lo} is above max {hi}")
        # ggml 0.25 clamps into a new tensor (0.20's ggml_clamp overwrote its input; the test that
        # the input survives guards against a return of that)
        return lib.ggml_clamp(self.c, a, float(lo), float(hi))

    def fill(self, a, value: float):
        """A new tensor of a's shape, every element ``value``."""
        _require_f32("fill", a)
        return lib.ggml_fill(self.c, lib.ggml_cont(self.c, a) if not _packed(a) else a, float(value))

    def cumsum(self, a):
        """Running sum along ne[0]."""
        _require_f32("cumsum", a)
        _require_packed("cumsum", a)
        return lib.ggml_cumsum(self.c, a)

    def softcap(self, a, cap: float):
        """``cap * tanh(a / cap)`` (gemma2 logit soft-capping)."""
        return self.scale(self.tanh(self.scale(a, 1.0 / cap)), cap)

    # -- positions and attention ---------------------------------------------------------------
    def rope(self, a, pos, n_dims: int, mode: int = ROPE_NEOX, *, freq_factors=None,
             freq_base: float = 10000.0, freq_scale: float = 1.0, n_ctx_orig: int = 0,
             ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0,
             beta_slow: float = 1.0):
        """Rotary embedding of a ne [head_dim, n_head, n_tokens] by I32 positions ``pos``."""
        _require_f32("rope", a)
        _require_dense("rope", a, pos, freq_factors)
        if pos.type != GGMLType.I32 or pos.ne[0] != a.ne[2] or pos.ne[1] * pos.ne[2] * pos.ne[3] != 1:
            raise _fail("rope", "positions must be I32 with one entry per token (a.ne[2])", a, pos)
        if n_dims <= 0 or n_dims % 2 or n_dims > a.ne[0]:
            raise _fail("rope", f"rotated dimensions {n_dims} must be even and at most head_dim", a)
        if mode not in (ROPE_NORMAL, ROPE_NEOX):
            raise ShapeError(f"rope: mode {mode} is not normal (0) or neox (2)")
        if freq_factors is not None:
            if freq_factors.type != GGMLType.F32 or freq_factors.ne[0] < n_dims // 2:
                raise _fail("rope", f"frequency factors must be F32 with at least {n_dims // 2} entries", freq_factors)
        return lib.ggml_rope_ext(
            self.c, a, pos, freq_factors if freq_factors is not None else ffi.NULL, int(n_dims), int(mode),
            int(n_ctx_orig), float(freq_base), float(freq_scale), float(ext_factor), float(attn_factor),
            float(beta_fast), float(beta_slow))

    def soft_max(self, a, mask=None, scale: float = 1.0, max_bias: float = 0.0):
        """softmax(a * scale + mask + ALiBi bias) over ne[0]."""
        _require_f32("soft_max", a)
        _require_packed("soft_max", a)
        if mask is not None:
            if mask.type not in (GGMLType.F32, GGMLType.F16):
                raise _fail("soft_max", "mask must be F32 or F16", mask)
            _require_packed("soft_max", mask, what="mask")
            if mask.ne[0] != a.ne[0] or mask.ne[1] < a.ne[1] or a.ne[2] % mask.ne[2] or a.ne[3] % mask.ne[3]:
                raise _fail("soft_max", "mask must be [n_kv, >= n_q, divisor of heads, divisor of batch]", a, mask)
        elif max_bias > 0:
            raise ShapeError("soft_max: an ALiBi bias (max_bias > 0) needs a mask")
        return lib.ggml_soft_max_ext(self.c, a, mask if mask is not None else ffi.NULL, float(scale), float(max_bias))

    def flash_attn(self, q, k, v, mask=None, scale: float = 1.0, max_bias: float = 0.0, softcap: float = 0.0):
        """Fused attention. q ne [d, n_q, h, b], k [d, n_kv, h_kv, b], v [d_v, n_kv, h_kv, b],
        mask F16 [n_kv, >= n_q, 1, 1] -> ne [d_v, h, n_q, b] (heads and tokens swapped)."""
        _require_f32("flash_attn", q)
        _require_dense("flash_attn", q, k, v)
        if k.ne[0] != q.ne[0] or v.ne[1] != k.ne[1] or k.ne[2] != v.ne[2] or q.ne[2] % k.ne[2] or q.ne[3] != k.ne[3] or k.ne[3] != v.ne[3]:
            raise _fail("flash_attn", "q/k/v must be [d, n_q, h, b], [d, n_kv, h_kv, b], [d_v, n_kv, h_kv, b] with h % h_kv == 0", q, k, v)
        for t, role in ((k, "K"), (v, "V")):
            tt = GGMLType(t.type)
            if tt not in _FLOAT and not (tt.is_quantized and tt.block_size > 1):
                raise _fail("flash_attn", f"{role} must be F32, F16, BF16 or quantized, not {tt.name}", t)
        if mask is not None:
            if mask.type != GGMLType.F16:
                raise _fail("flash_attn", "the mask must be F16", mask)
            _require_packed("flash_attn", mask, what="the mask")
            if mask.ne[0] != k.ne[1] or mask.ne[1] < q.ne[1] or q.ne[2] % mask.ne[2] or q.ne[3] % mask.ne[3]:
                raise _fail("flash_attn", "mask must be [n_kv, >= n_q, 1, 1]", q, k, mask)
        elif max_bias > 0:
            raise ShapeError("flash_attn: an ALiBi bias (max_bias > 0) needs a mask")
        out = lib.ggml_flash_attn_ext(self.c, q, k, v, mask if mask is not None else ffi.NULL,
                                      float(scale), float(max_bias), float(softcap))
        lib.ggml_flash_attn_ext_set_prec(out, lib.GGML_PREC_F32)
        return out

    # -- layout ----------------------------------------------------------------------------------
    def reshape(self, a, ne: Sequence[int]):
        ne = [int(n) for n in ne] + [1] * (4 - len(ne))
        if len(ne) > 4 or math.prod(ne) != math.prod(ne_of(a)):
            raise _fail("reshape", f"cannot reshape to {ne}: element counts differ", a)
        if not lib.ggml_is_contiguous(a):
            nb = _strides_for(a, ne)  # a strided source may still be reshaped as a view
            if nb is None:
                raise _fail("reshape", "source must be contiguous (cont it first)", a)
            return lib.ggml_view_4d(self.c, a, *ne, nb[1], nb[2], nb[3], 0)
        return lib.ggml_reshape_4d(self.c, a, *ne)

    def view(self, a, ne: Sequence[int], nb: Sequence[int] | None = None, offset: int = 0):
        """A strided window into ``a``; ``nb`` are byte strides of dims 1..3 (default: a's)."""
        ne = [int(n) for n in ne] + [1] * (4 - len(ne))
        nb = list(nb) if nb is not None else [a.nb[1], a.nb[2], a.nb[3]]
        nb = [int(x) for x in nb] + [0] * (3 - len(nb))
        block = GGMLType(a.type).block_size
        if ne[0] % block or (block > 1 and a.nb[0] != lib.ggml_type_size(a.type)):
            raise _fail("view", f"a window of a {GGMLType(a.type).name} tensor must span whole blocks of {block} "
                                f"along ne[0] of a source with whole rows (got ne[0]={ne[0]})", a)
        row = lib.ggml_row_size(a.type, ne[0])
        last = offset + row + sum((ne[i + 1] - 1) * nb[i] for i in range(3))
        if offset < 0 or any(n <= 0 for n in ne) or last > lib.ggml_nbytes(a):
            raise _fail("view", f"window ne={ne} nb={nb} offset={offset} reaches byte {last}, past the source's {lib.ggml_nbytes(a)}", a)
        # ggml also asserts that the window's dense size (row bytes x rows, whatever the strides)
        # fits in the memory it views: the source's own source when the source is a view
        root, base = (a.view_src, offset + a.view_offs) if a.view_src != ffi.NULL else (a, offset)
        dense_end = base + row * ne[1] * ne[2] * ne[3]
        if dense_end > lib.ggml_nbytes(root):
            raise _fail("view", f"window ne={ne} at offset {offset} needs {row * ne[1] * ne[2] * ne[3]} bytes as a dense "
                                f"block, which reach past the {lib.ggml_nbytes(root)} bytes of the viewed memory", a)
        return lib.ggml_view_4d(self.c, a, ne[0], ne[1], ne[2], ne[3], nb[0], nb[1], nb[2], int(offset))

    def window(self, a, dim: int, start: int, length: int, step: int = 1):
        """Elements [start, start + length * step) with stride ``step`` along ne[dim] (a view,
        except for a stride along ne[0], which ggml views cannot express: that one is copied)."""
        if not 0 <= dim < 4:
            raise ShapeError(f"slice: dimension {dim} is not in 0..3")
        n = int(a.ne[dim])
        if step < 1 or start < 0 or length < 1 or start + (length - 1) * step >= n:
            raise _fail("slice", f"window start={start} length={length} step={step} does not fit ne[{dim}]={n}", a)
        if a.nb[0] != lib.ggml_type_size(a.type):
            # a permuted source whose ne[0] is not adjacent in memory: ggml views always take
            # ne[0] dense (ggml_view_4d sets nb[0] to the element size), so copy it first
            a = self.cont(a)
        ne = [int(a.ne[i]) for i in range(4)]
        ne[dim] = length
        nb = [int(a.nb[i]) for i in range(4)]
        if dim == 0 and step > 1:
            # x[start::step] along rows: view the row as [step, n/step] and take row `start`
            if n % step or start >= step or length != n // step:
                raise _fail("slice", f"a strided window along ne[0] must take every {step}-th element of the whole "
                                     f"row (ne[0] divisible by {step}, start below it)", a)
            if not _packed(a):
                a = self.cont(a)
            grid = self.reshape(a, [step, n // step, ne[1], ne[2] * ne[3]])
            esize = GGMLType(a.type).type_size
            picked = self.view(grid, [1, length, ne[1], ne[2] * ne[3]], [grid.nb[1], grid.nb[2], grid.nb[3]],
                               start * esize)
            return self.reshape(self.cont(picked), ne)
        nb[dim] *= step
        return self.view(a, ne, nb[1:], start * int(a.nb[dim]))

    def repeat(self, a, ne: Sequence[int]):
        """Tile ``a`` to ``ne`` (each dimension a multiple of a's)."""
        ne = [int(n) for n in ne] + [1] * (4 - len(ne))
        if len(ne) > 4 or any(n <= 0 or a.ne[i] <= 0 or n % int(a.ne[i]) for i, n in enumerate(ne)):
            raise _fail("repeat", f"every dimension of {ne} must be a positive multiple of the input's", a)
        _require_f32("repeat", a)
        if a.nb[0] != lib.ggml_type_size(a.type):  # ggml's kernel asserts adjacent row elements (abort)
            a = self.cont(a)
        return lib.ggml_repeat_4d(self.c, a, *ne)

    def pad(self, a, pads: Sequence[int]):
        """Zeros before and after along each dimension: pads = [before0, after0, before1, after1, ...]."""
        pads = [int(x) for x in pads] + [0] * (8 - len(pads))
        if len(pads) > 8 or min(pads) < 0:
            raise ShapeError(f"pad: {pads} must be 8 or fewer non-negative counts")
        _require_f32("pad", a)
        if not _packed(a):
            a = self.cont(a)
        return lib.ggml_pad_ext(self.c, a, *pads)

    def ssm_conv(self, sx, taps):
        """Depthwise causal convolution (ggml's short convolution of state-space and LFM layers):
        sx ne [R + n, C, 1] (time innermost, the R earlier steps first), taps ne [R + 1, C]
        -> ne [C, n, 1], out[c, t] = sum_j taps[j, c] * sx[t + j, c]."""
        _require_f32("ssm_conv", sx, taps)
        if sx.ne[2] != 1 or sx.ne[3] != 1 or taps.ne[2] != 1 or taps.ne[3] != 1:
            raise _fail("ssm_conv", "expects sx [R + n, C] and taps [R + 1, C] (one sequence)", sx, taps)
        if sx.ne[1] != taps.ne[1] or sx.ne[0] < taps.ne[0]:
            raise _fail("ssm_conv", "sx must be [R + n, C] with n >= 1 for taps [R + 1, C]", sx, taps)
        if not _packed(sx):
            sx = self.cont(sx)
        if not _packed(taps):
            taps = self.cont(taps)
        return lib.ggml_ssm_conv(self.c, sx, taps)

    def zeros(self, ne: Sequence[int]):
        """A new F32 tensor of zeros (computed in the graph, like any other node)."""
        shape = self.ctx.new_tensor(GGMLType.F32, [int(n) for n in ne])
        return lib.ggml_fill(self.c, shape, 0.0)

    def gated_delta_net(self, q, k, v, g, beta, state):
        """The gated delta rule (Qwen3-Next, Kimi linear attention) over n tokens of one sequence:
        q, k ne [S, H, n], v ne [S, H, n], g ne [1, H, n] (a decay per head) or [S, H, n] (per key
        channel), beta ne [1, H, n], state ne [S, S, H] (the memory before these tokens). Per head
        and token: M *= exp(g); M += k (beta (v - k.M)); out = q.M / sqrt(S). Returns
        (out ne [S, H, n], the memory after them ne [S, S, H])."""
        _require_f32("gated_delta_net", q, k, v, g, beta, state)
        S, H, n = v.ne[0], v.ne[1], v.ne[2]
        if v.ne[3] != 1 or list(q.ne[0:3]) != [S, H, n] or list(k.ne[0:3]) != [S, H, n]:
            raise _fail("gated_delta_net", "expects q, k, v ne [S, H, n] of one sequence (heads already "
                                           "repeated to v's; key and value head sizes equal)", q, k, v)
        if g.ne[0] not in (1, S) or list(g.ne[1:3]) != [H, n] or list(beta.ne[0:3]) != [1, H, n]:
            raise _fail("gated_delta_net", "expects g ne [1 or S, H, n] and beta ne [1, H, n]", g, beta)
        if list(state.ne[0:3]) != [S, S, H]:
            raise _fail("gated_delta_net", "expects the state ne [S, S, H]", state, v)
        q, k, v, g, beta, state = (x if _packed(x) else self.cont(x) for x in (q, k, v, g, beta, state))
        r = lib.ggml_gated_delta_net(self.c, q, k, v, g, beta, state, 1)  # ne [S*H, n + S]: outputs, then memory
        f = r.nb[0]
        out = lib.ggml_view_3d(self.c, r, S, H, n, f * S, f * S * H, 0)
        after = lib.ggml_view_3d(self.c, r, S, S, H, f * S, f * S * S, f * S * H * n)
        return out, after

    def ssm_scan(self, x, dt, A, B, C, state):
        """The selective scan of Mamba layers over n tokens of one sequence: x ne [P, H, n],
        dt ne [H, n] (before its softplus), A ne [1, H] (Mamba-2: one decay per head) or [N, H]
        (Mamba-1: one per state entry, with P = 1), B, C ne [N, G, n] (G groups of heads,
        H % G == 0), state ne [N, P, H] (before these tokens). Per head h, token t:
        d = softplus(dt); S = S exp(d A) + d x B^T; y = S C (the group of h's B and C).
        Returns (y ne [P, H, n], the state after them ne [N, P, H])."""
        _require_f32("ssm_scan", x, dt, A, B, C, state)
        P, H, n = x.ne[0], x.ne[1], x.ne[2]
        N, G = B.ne[0], B.ne[1]
        if (x.ne[3] != 1 or list(dt.ne[0:3]) != [H, n, 1] or A.ne[0] not in (1, N) or list(A.ne[1:3]) != [H, 1]
                or A.ne[0] == N != 1 and P != 1):
            raise _fail("ssm_scan", "expects x ne [P, H, n] of one sequence, dt ne [H, n], A ne [1, H] "
                                    "(or [N, H] with P = 1)", x, dt, A)
        if list(B.ne[0:4]) != [N, G, n, 1] or list(C.ne[0:4]) != [N, G, n, 1] or G == 0 or H % G:
            raise _fail("ssm_scan", "expects B and C ne [N, G, n] with G dividing the heads", B, C, x)
        if list(state.ne[0:4]) != [N, P, H, 1]:
            raise _fail("ssm_scan", "expects the state ne [N, P, H]", state, x, B)
        x, dt, A, B, C, state = (t if _packed(t) else self.cont(t) for t in (x, dt, A, B, C, state))
        # ggml reads each sequence's state slot from an I32 tensor: slot 0, the argmax of one number
        slot = lib.ggml_argmax(self.c, lib.ggml_view_2d(self.c, dt, 1, 1, dt.nb[1], 0))
        r = lib.ggml_ssm_scan(self.c, state, x, dt, A, B, C, slot, 1)  # y, then the state after
        f = r.nb[0]
        y = lib.ggml_view_3d(self.c, r, P, H, n, f * P, f * P * H, 0)
        after = lib.ggml_view_3d(self.c, r, N, P, H, f * N, f * N * P, f * P * H * n)
        return y, after

    def permute(self, a, axes: Sequence[int]):
        """ggml semantics: source dimension i moves to position ``axes[i]``."""
        axes = [int(x) for x in axes] + list(range(len(axes), 4))
        if sorted(axes) != [0, 1, 2, 3]:
            raise _fail("permute", f"axes {axes} are not a permutation of 0..3", a)
        _require_rows_kept("permute", a, axes[0] == 0)
        return lib.ggml_permute(self.c, a, *axes)

    def transpose(self, a):
        _require_rows_kept("transpose", a, False)
        return lib.ggml_transpose(self.c, a)

    def cont(self, a):
        _check_conversion("cont", a, GGMLType(a.type), True)
        return lib.ggml_cont(self.c, a)

    def concat(self, a, b, dim: int):
        if not 0 <= dim < 4:
            raise ShapeError(f"concat: dimension {dim} is not in 0..3")
        if a.type != b.type or any(a.ne[i] != b.ne[i] for i in range(4) if i != dim):
            raise _fail("concat", f"shapes must agree except in dimension {dim}, types must match", a, b)
        return lib.ggml_concat(self.c, a, b, int(dim))

    def cast(self, a, gtype: GGMLType):
        gtype = GGMLType(gtype)
        if gtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.I32) and a.ne[0] % gtype.block_size:
            raise _fail("cast", f"rows of {a.ne[0]} do not fill {gtype.name} blocks of {gtype.block_size}", a)
        _check_conversion("cast", a, gtype, True)
        return lib.ggml_cast(self.c, a, gtype)

    def cpy(self, a, dst):
        """Copy (and convert) ``a`` into ``dst``; returns the node to add to the graph."""
        if math.prod(ne_of(a)) != math.prod(ne_of(dst)):
            raise _fail("cpy", "element counts differ", a, dst)
        if dst.ne[0] % GGMLType(dst.type).block_size:
            raise _fail("cpy", "destination rows do not fill its type's blocks", dst)
        _check_conversion("cpy", a, GGMLType(dst.type), _packed(dst), dst.ne[0])
        return lib.ggml_cpy(self.c, a, dst)

    def set_rows(self, dst, src, rows):
        """Write the rows of ``src`` into ``dst`` at I32/I64 row indices ``rows`` (KV-cache store)."""
        if rows.type not in (GGMLType.I32, GGMLType.I64):
            raise _fail("set_rows", "row indices must be I32 or I64", rows)
        if (src.ne[0] != dst.ne[0] or rows.ne[0] != src.ne[1] or src.ne[2] != dst.ne[2] or src.ne[3] != dst.ne[3]
                or src.ne[2] % rows.ne[1] or src.ne[3] % rows.ne[2] or rows.ne[3] != 1):
            raise _fail("set_rows", "src must be [row, n_rows, ne2, ne3] for dst [row, n_dst_rows, ne2, ne3] "
                        "with one index per src row", dst, src, rows)
        _require_f32("set_rows", src)
        _require_dense("set_rows", dst, src, rows)
        self._limit_indices(rows, dst.ne[1], "set_rows")
        return lib.ggml_set_rows(self.c, dst, src, rows)

    # -- reductions and routing ----------------------------------------------------------------
    def sum_rows(self, a):
        _require_f32("sum_rows", a)
        _require_dense("sum_rows", a)
        return lib.ggml_sum_rows(self.c, a)

    def argsort(self, a, descending: bool = True):
        _require_f32("argsort", a)
        _require_dense("argsort", a)
        _require_packed("argsort", a)  # the kernel walks rows as data + i * nb[1]
        order = lib.GGML_SORT_ORDER_DESC if descending else lib.GGML_SORT_ORDER_ASC
        return lib.ggml_argsort(self.c, a, order)

    def argmax(self, a):
        """I32 [rows]: the index of the largest element of each row of a matrix (first on ties)."""
        _require_f32("argmax", a)
        _require_packed("argmax", a)
        if a.ne[2] != 1 or a.ne[3] != 1:
            raise _fail("argmax", "needs a matrix (reshape it to [row, rows] first)", a)
        return lib.ggml_argmax(self.c, a)

    def top_k(self, a, k: int):
        """I32 indices of the ``k`` largest entries of each row, largest first."""
        _require_f32("top_k", a)
        _require_dense("top_k", a)
        _require_packed("top_k", a)  # the kernel walks rows as data + i * nb[1]
        if not 0 < k <= a.ne[0]:
            raise _fail("top_k", f"k={k} must be between 1 and the row length {a.ne[0]}", a)
        # argsort_top_k is a strided view of the full argsort; cont makes it readable and usable
        # anywhere a contiguous tensor is required.
        return lib.ggml_cont(self.c, lib.ggml_argsort_top_k(self.c, a, int(k)))


# Tensors one op may create (the op, plus views or helpers some ggml constructors add).
_ROOM_PER_OP = 4


def _guard(fn):
    @functools.wraps(fn)
    def op(self, *args, **kwargs):
        self.ctx.ensure_room(_ROOM_PER_OP)  # ggml aborts when its context is full
        return fn(self, *args, **kwargs)

    return op


for _name, _fn in list(vars(Ops).items()):
    if not _name.startswith("_") and _name != "name" and inspect.isfunction(_fn):
        setattr(Ops, _name, _guard(_fn))
del _name, _fn
