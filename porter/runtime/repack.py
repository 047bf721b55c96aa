"""ggml's CPU repack buffer: quantized matrices re-laid out for faster products.

Only the ``CPU_REPACK`` extra buffer type is ever used (never AMX: its kernels crash on some
machines that report AMX, and porter's ggml is built without them). A weight goes there only if
every use of it is as the matrix of a ``mul_mat`` (or the experts of a ``mul_mat_id``) and
ggml's CPU device confirms it supports that product from a repacked buffer. That check is
llama.cpp's own way of choosing weight buffers (it builds the op with the weight in a dummy
buffer of the candidate type and asks ``ggml_backend_dev_supports_op``), so the same types are
repacked as there: with ggml 0.25.3 on AVX2, Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL, MXFP4 and Q8_0
(Q2_K with AVX-512), each when its row count fits the packed tile.
"""

from __future__ import annotations

import functools

from porter.runtime._lib import ffi, lib
from porter.runtime.core import Context
from porter.runtime.types import GGMLType

REPACK_NAME = "CPU_REPACK"


@functools.lru_cache(maxsize=1)
def _device_and_repack_buft():
    reg = lib.ggml_backend_cpu_reg()
    dev = lib.ggml_backend_reg_dev_get(reg, 0)
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if fn == ffi.NULL:
        return dev, None
    bufts = ffi.cast("ggml_backend_dev_get_extra_bufts_t", fn)(dev)
    i = 0
    while bufts[i] != ffi.NULL:
        if ffi.string(lib.ggml_backend_buft_name(bufts[i])).decode() == REPACK_NAME:
            return dev, bufts[i]
        i += 1
    return dev, None


def repack_buffer_type():
    return _device_and_repack_buft()[1]


@functools.lru_cache(maxsize=256)
def supports(gtype: int, ne0: int, ne1: int, ne2: int = 0) -> bool:
    """Does ggml's CPU device run mul_mat with a (gtype, [ne0, ne1]) matrix held repacked?
    With ``ne2`` (experts): mul_mat_id with a (gtype, [ne0, ne1, ne2]) expert tensor."""
    dev, buft = _device_and_repack_buft()
    try:
        gt = GGMLType(gtype)
    except ValueError:
        return False
    if buft is None or not gt.is_quantized or ne0 % gt.block_size:
        return False
    ctx = Context(4)
    dummy = lib.ggml_backend_buft_alloc_buffer(buft, 0)
    try:
        if ne2:
            w = ctx.new_tensor(gt, [ne0, ne1, ne2])
            x = ctx.new_tensor(GGMLType.F32, [ne0, 1, 16])
            ids = ctx.new_tensor(GGMLType.I32, [1, 16])
            op = lib.ggml_mul_mat_id(ctx.ptr, w, x, ids)
        else:
            w = ctx.new_tensor(gt, [ne0, ne1])
            x = ctx.new_tensor(GGMLType.F32, [ne0, 16])
            op = lib.ggml_mul_mat(ctx.ptr, w, x)
        w.buffer = dummy
        return bool(lib.ggml_backend_dev_supports_op(dev, op))
    finally:
        if dummy != ffi.NULL:
            lib.ggml_backend_buffer_free(dummy)
        ctx.close()


def weights_used_only_as(spec, allowed: set[tuple[str, int]]) -> set[str]:
    """Weight names (layer patterns) whose every use is one of ``allowed`` (op, input position)."""
    from porter.spec import Repeat

    uses: dict[str, set[tuple[str, int]]] = {}
    for item in spec.graph:
        for node in (item.body if isinstance(item, Repeat) else [item]):
            for pos, src in enumerate(node.inputs):
                uses.setdefault(src, set()).add((node.op, pos))
    return {w.name for w in spec.weights if uses.get(w.name) and uses[w.name] <= allowed}


def matmul_only_weights(spec) -> set[str]:
    """Weight names (layer patterns) used only as the matrix operand of mul_mat."""
    return weights_used_only_as(spec, {("mul_mat", 0)})


def expert_only_weights(spec) -> set[str]:
    """Weight names (layer patterns) used only as the experts of mul_mat_id."""
    return weights_used_only_as(spec, {("mul_mat_id", 0)})
