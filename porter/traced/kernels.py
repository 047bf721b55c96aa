"""transformers' swappable kernels, kept whole in the trace where ggml has the same kernel.

transformers marks a few functions as kernels that faster packages may replace
(``use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")``...); their PyTorch
fallbacks are long chunked algorithms (padding to the chunk size, triangular solves, a Python loop
over the chunks) that torch.export unrolls for one sequence length. Where ggml has that kernel
(``ggml_gated_delta_net``, ``ggml_ssm_scan``), porter swaps the fallback for a custom op while it
exports, so the trace holds one node with the kernel's inputs, which the lowering maps to the
runtime op. The op's eager implementation is transformers' own fallback: evaluating the trace
(node-by-node parity) computes exactly what transformers computes.

A kernel is recognised by the name transformers gives it (the decorator's ``func_name``), not by the
function's name, which differs between model files.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch

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


@torch.library.custom_op("porter::ssm_scan", mutates_args=())
def ssm_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_min: float, dt_max: float,
             chunk_size: int, impl: str) -> torch.Tensor:
    """The selective scan of Mamba-2 layers for a fresh sequence: x [B, T, H, P], dt [B, T, H],
    A [H], B, C [B, T, G, N], D and dt_bias [H] -> y [B, T, H, P] (D x included). ``impl`` names
    transformers' fallback that computes it."""
    y = _fallback(impl)(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                        dt_limit=(dt_min, dt_max), return_final_states=False)
    return y.clone()


@ssm_scan.register_fake
def _ssm_scan_shape(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_min, dt_max, chunk_size, impl):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("porter::selective_scan", mutates_args=())
def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                   delta_softplus: bool, impl: str) -> torch.Tensor:
    """The selective scan of Mamba(-1) layers for a fresh sequence: x, dt [B, D_inner, T],
    A [D_inner, N], B, C [B, N, T], D and delta_bias [D_inner], z [B, D_inner, T] -> y
    [B, D_inner, T] (D x and the silu(z) gate included). ``impl`` names transformers' fallback."""
    y = _fallback(impl)(x, dt, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                        return_last_state=False)
    return y.clone()


@selective_scan.register_fake
def _selective_scan_shape(x, dt, A, B, C, D, z, delta_bias, delta_softplus, impl):
    return x.new_empty(x.shape)


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


def _delta_rule_stand_in(fn, impl: str):
    """A function with the delta rule kernel's signature that calls porter's op (a fresh sequence)."""

    def kernel(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, **kwargs):
        if initial_state is not None or output_final_state:  # not a fresh sequence: not what porter traces
            return fn(query, key, value, g=g, beta=beta, chunk_size=chunk_size, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                      **kwargs)
        out = torch.ops.porter.delta_rule(query, key, value, g, beta, bool(use_qk_l2norm_in_kernel), impl)
        return out, None

    return kernel


def _ssm_scan_stand_in(fn, impl: str):
    """A function with Mamba-2's chunked scan kernel's signature that calls porter's op."""

    def kernel(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
               dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        # gating inside the kernel (z) or packed sequences (seq_idx, cu_seqlens): not what porter traces
        extra = [k for k in ("z", "seq_idx", "cu_seqlens") if kwargs.get(k) is not None]
        if initial_states is not None or return_final_states or extra:
            return fn(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                      dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states, **kwargs)
        lo, hi = dt_limit if dt_limit is not None else (0.0, float("inf"))
        return torch.ops.porter.ssm_scan(hidden_states, dt, A, B, C, D, dt_bias, bool(dt_softplus), float(lo),
                                         float(hi), int(chunk_size), impl)

    return kernel


def _selective_scan_stand_in(fn, impl: str):
    """A function with Mamba's selective scan kernel's signature that calls porter's op."""

    def kernel(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False, **kwargs):
        if return_last_state:  # a cache being filled: not what porter traces
            return fn(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state, **kwargs)
        return torch.ops.porter.selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                               impl)

    return kernel


# transformers' kernel name -> what stands for it in a trace (a function calling porter's op)
STAND_INS = {
    "chunk_gated_delta_rule": _delta_rule_stand_in,  # Qwen3-Next, Qwen3.5, OLMo hybrid: a decay per head
    "chunk_kda": _delta_rule_stand_in,  # Kimi delta attention: a decay per key channel
    "mamba_chunk_scan_combined": _ssm_scan_stand_in,  # Mamba-2 and its hybrids (Bamba, Nemotron-H, ...)
    "selective_scan_fn": _selective_scan_stand_in,  # Mamba, Falcon-Mamba, Jamba
}


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
            stand_in = STAND_INS.get(kernel_name(fn) or "") if callable(fn) else None
            if stand_in is not None:
                impl = f"{module_name}:{attr}"
                _FALLBACKS[impl] = getattr(fn, "__wrapped__", fn)
                swapped.append((module, attr, fn))
                setattr(module, attr, stand_in(fn, impl))
    try:
        yield [f"{m.__name__}.{a}" for m, a, _ in swapped]
    finally:
        for module, attr, fn in swapped:
            setattr(module, attr, fn)
