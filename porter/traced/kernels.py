"""transformers' swappable kernels, kept whole in the trace where ggml has the same kernel.

transformers marks a few functions as kernels that faster packages may replace
(``use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")``...); their PyTorch
fallbacks are long chunked algorithms (padding to the chunk size, triangular solves, a Python loop
over the chunks) that torch.export unrolls for one sequence length. Where ggml has that kernel
(``ggml_gated_delta_net``), porter swaps the fallback for a custom op while it exports, so the trace
holds one node with the kernel's inputs, which the lowering maps to the runtime op. The op's eager
implementation is transformers' own fallback: evaluating the trace (node-by-node parity) computes
exactly what transformers computes.

A kernel is recognised by the name transformers gives it (the decorator's ``func_name``), not by the
function's name, which differs between model files.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

# transformers' kernel name -> the porter op that stands for it in a trace
KERNEL_OPS = {
    "chunk_gated_delta_rule": "delta_rule",  # Qwen3-Next, Qwen3.5, OLMo hybrid: one decay per head
    "chunk_kda": "delta_rule",  # Kimi delta attention: one decay per key channel
}

_FALLBACKS: dict[str, object] = {}  # "module:name" -> transformers' PyTorch fallback


@torch.library.custom_op("porter::delta_rule", mutates_args=())
def delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               qk_l2norm: bool, impl: str) -> torch.Tensor:
    """The gated delta rule of a fresh sequence (no initial state): q, k [B, T, Hk, dk],
    v [B, T, Hv, dv], g [B, T, Hv] (or [B, T, Hv, dk]: a decay per key channel), beta [B, T, Hv]
    -> [B, T, Hv, dv]. ``impl`` names transformers' fallback that computes it."""
    out, _ = _fallback(impl)(query, key, value, g=g, beta=beta, initial_state=None, output_final_state=False,
                             use_qk_l2norm_in_kernel=qk_l2norm)
    return out.clone()  # a custom op's output must not alias its inputs


@delta_rule.register_fake
def _delta_rule_shape(query, key, value, g, beta, qk_l2norm, impl):
    return value.new_empty(value.shape, dtype=query.dtype)


def _fallback(impl: str):
    fn = _FALLBACKS.get(impl)
    if fn is None:  # a trace loaded in another process: transformers' module holds it
        module, name = impl.split(":")
        fn = getattr(importlib.import_module(module), name)
        fn = getattr(fn, "__wrapped__", fn)  # the PyTorch fallback under transformers' dispatch wrapper
    return fn


def kernel_name(fn) -> str | None:
    """The name transformers' kernel decorator gave ``fn`` (``chunk_gated_delta_rule``...), if any."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells or "func_name" not in code.co_freevars:
        return None
    value = cells[code.co_freevars.index("func_name")].cell_contents
    return value if isinstance(value, str) else None


def _standing_in(fn, impl: str):
    """A function with the kernel's signature that calls porter's op (a fresh sequence only)."""
    fallback = getattr(fn, "__wrapped__", fn)

    def kernel(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, **kwargs):
        if initial_state is not None or output_final_state:  # not a fresh sequence: not what porter traces
            return fn(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                      **kwargs)
        out = torch.ops.porter.delta_rule(query, key, value, g, beta, bool(use_qk_l2norm_in_kernel), impl)
        return out, None

    _FALLBACKS[impl] = fallback
    return kernel


@contextlib.contextmanager
def standing_in(model):
    """While exporting ``model``: transformers' kernels that porter maps to a ggml kernel are
    replaced, in the modules that define the model's layers, by porter's ops."""
    swapped = []
    modules = {type(m).__module__ for m in model.modules()}
    for module_name in sorted(modules):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for attr, fn in list(vars(module).items()):
            if callable(fn) and KERNEL_OPS.get(kernel_name(fn) or "") is not None:
                swapped.append((module, attr, fn))
                setattr(module, attr, _standing_in(fn, f"{module_name}:{attr}"))
    try:
        yield [f"{m.__name__}.{a}" for m, a, _ in swapped]
    finally:
        for module, attr, fn in swapped:
            setattr(module, attr, fn)
