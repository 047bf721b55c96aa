"""Pieces several plugins share (not a plugin: registers no architecture)."""

from __future__ import annotations

import numpy as np

from porter.arch import Architecture


def even_rotary(fields: dict, head_dim: int, key: str = "partial_rotary_factor") -> None:
    """transformers rotates ``int(head_dim * factor)`` dims and needs that even: fall back to half."""
    p = fields.get(key)
    if p is not None and int(head_dim * p) % 2:
        fields[key] = 0.5


def drop_fields(config, *names):
    """Remove size fields the shared tiny defaults set but this architecture does not have."""
    for name in names:
        if name in vars(config):
            delattr(config, name)
    return config


def unfuse_per_head(w: np.ndarray, n_kv: int, n_head: int, head_dim: int) -> np.ndarray:
    """[kv group: n_head/n_kv q heads, k, v] x n_kv rows -> [all q; all k; all v] (llama.cpp's order)."""
    g = w.reshape(n_kv, n_head // n_kv + 2, head_dim, *w.shape[1:])
    q = g[:, :-2].reshape(n_head * head_dim, *w.shape[1:])
    k = g[:, -2].reshape(n_kv * head_dim, *w.shape[1:])
    v = g[:, -1].reshape(n_kv * head_dim, *w.shape[1:])
    return np.concatenate([q, k, v])


class FusedQKV(Architecture):
    """Shared by the fused-qkv plugins: the qkv bias follows the checkpoint."""

    def configure(self, k):
        super().configure(k)
        k["qkv_bias"] = self.has("blk.0.attn_qkv.bias") or k["qkv_bias"]


class InterleavedQKV(FusedQKV):
    """Checkpoints whose fused qkv is grouped per kv head ([q heads of the group, k, v] x n_kv;
    one group per head when there is no GQA): written in llama.cpp's [all q; all k; all v]."""

    def transform(self, gguf_name, arrays):
        if ".attn_qkv." in gguf_name:
            hp = self.hp
            return unfuse_per_head(arrays[0], hp.num_kv_heads, hp.num_heads, hp.head_dim)
        return super().transform(gguf_name, arrays)
