"""The attention masks a graph reads, filled for each forward pass (causal, sliding window, ALiBi)."""

from __future__ import annotations

import numpy as np

from porter.spec import Spec


def attention_masks(spec: Spec, positions: np.ndarray, n_kv: int, n_valid: int) -> dict[str, np.ndarray]:
    """Every mask input kind for query ``positions`` over ``n_kv`` cache cells, of which the first
    ``n_valid`` hold keys: 0 where a query may attend, -inf elsewhere."""
    if len(positions) == 1 and not any(d.kind == "kq_mask_alibi" for d in spec.inputs):
        return _one_query_masks(spec, int(positions[0]), n_kv, n_valid)
    kv_pos = np.arange(n_kv)[None, :]
    q = positions[:, None]
    visible = np.broadcast_to(kv_pos < n_valid, (len(positions), n_kv))
    if spec.causal:
        visible = visible & (kv_pos <= q)
    masks = {"kq_mask": visible}
    window = spec.hparams.get("sliding_window")
    if window:
        masks["kq_mask_swa"] = visible & (kv_pos > q - int(window))
    out = {k: np.where(v, 0.0, -np.inf).astype(np.float16) for k, v in masks.items()}
    if any(d.kind == "kq_mask_alibi" for d in spec.inputs):
        out["kq_mask_alibi"] = alibi_mask(spec.hparams, visible, n_kv)
    return out


def _one_query_masks(spec: Spec, q: int, n_kv: int, n_valid: int) -> dict[str, np.ndarray]:
    """The masks of one query (a decode step), as runs of zeros in a row of -inf: what
    :func:`attention_masks` computes, without its [n_tokens, n_kv] temporaries (this runs once
    per generated token)."""
    end = min(n_valid, q + 1) if spec.causal else n_valid

    def row(start: int) -> np.ndarray:
        out = np.full((1, n_kv), -np.inf, dtype=np.float16)
        out[0, max(0, start):max(0, end)] = 0.0
        return out

    masks = {"kq_mask": row(0)}
    window = spec.hparams.get("sliding_window")
    if window:
        masks["kq_mask_swa"] = row(q - int(window) + 1)
    return masks


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and back."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def alibi_mask(hparams: dict, visible: np.ndarray, n_kv: int) -> np.ndarray:
    """[n_head, n_tokens, n_kv] F32: slope_h * key position / sqrt(head_dim) where visible, -inf
    elsewhere (times ``alibi_scale`` instead, when the spec gives it: traced graphs add the bias
    to scores already scaled). Absolute key positions, as transformers uses (softmax ignores the
    per-row shift to relative distances); with ``alibi_bf16`` the products are rounded as
    transformers does."""
    slopes = np.asarray(hparams["alibi_slopes"], np.float32)
    pos = np.arange(n_kv, dtype=np.float32)
    if hparams.get("alibi_bf16"):
        bias = _bf16(_bf16(slopes)[:, None] * pos[None, :])
    else:
        bias = slopes[:, None] * pos[None, :]
    if "alibi_scale" in hparams:
        bias = bias * np.float32(hparams["alibi_scale"])
    else:
        bias = bias / np.float32(np.sqrt(float(hparams["head_dim"])))
    return np.where(visible[None, :, :], bias[:, None, :], -np.inf).astype(np.float32)
