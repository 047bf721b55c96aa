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
    """The masks of one query (a decode step): what :func:`attention_masks` computes, without
    its [n_tokens, n_kv] temporaries."""
    window = int(spec.hparams.get("sliding_window") or 0)
    masks = {"kq_mask": np.empty((1, n_kv), np.float16)}
    if window:
        masks["kq_mask_swa"] = np.empty((1, n_kv), np.float16)
    write_one_query_masks({k: v.reshape(-1) for k, v in masks.items()}, spec.causal, window, q, n_valid)
    return masks


def write_one_query_masks(rows: dict[str, np.ndarray], causal: bool, window: int, q: int, n_valid: int) -> None:
    """Fill the mask rows of query position ``q`` in place (``rows``: flat arrays by input kind,
    ``kq_mask`` and ``kq_mask_swa`` where present): a run of zeros over the cells it may attend
    in a row of -inf."""
    end = min(n_valid, q + 1) if causal else n_valid
    for kind, start in (("kq_mask", 0), ("kq_mask_swa", q - window + 1)):
        row = rows.get(kind)
        if row is not None:
            row.fill(-np.inf)
            row[max(0, start):max(0, end)] = 0.0


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
