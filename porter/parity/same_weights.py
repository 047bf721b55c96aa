"""Give a transformers model the weights a GGUF actually stores.

A quantized GGUF differs from transformers for two reasons: its weights are rounded (Q8_0, Q4_K,
F16...), and ggml computes with them (for quantized types it also rounds the activations to 8
bits inside each matrix product). Comparing porter with transformers running the *same rounded
weights* isolates the second part, the port itself: ``porter parity --against gguf``.

Each GGUF tensor is dequantized and mapped back onto the checkpoint parameters it was made from,
through its :class:`~porter.convert.plan.TensorPlan`. Transforms are data movement for the
matrices that get quantized (renames, q/k row permutations, fusions, transposes), so where every
element lands is found by running the transform on element indices. A transform that does
arithmetic cannot be inverted that way and is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from porter.errors import PorterError

# Element indices go through a transform as float32 (plugins' transforms may compute in float32)
# in two parts, index // 4096 and index % 4096, each exact in float32 up to 2**36 elements.
_SPLIT = 1 << 12


def _source_positions(plan, shapes: dict[str, tuple[int, ...]]) -> tuple[np.ndarray, list[int]]:
    """For every element of the GGUF tensor, the flat index into the concatenated sources."""
    sizes = [int(np.prod(shapes[s])) for s in plan.sources]
    offsets = np.cumsum([0, *sizes])
    if plan.transform is None:
        return np.arange(offsets[-1], dtype=np.int64), sizes
    idx = [np.arange(o, o + n, dtype=np.int64).reshape(shapes[s]) for s, o, n in zip(plan.sources, offsets, sizes)]
    hi = np.asarray(plan.transform([(i // _SPLIT).astype(np.float32) for i in idx]), dtype=np.float64)
    lo = np.asarray(plan.transform([(i % _SPLIT).astype(np.float32) for i in idx]), dtype=np.float64)
    pos = hi * _SPLIT + lo
    moved_only = (hi.shape == lo.shape and np.all(pos == np.round(pos)) and np.all((lo >= 0) & (lo < _SPLIT))
                  and np.all((pos >= 0) & (pos < offsets[-1])) and np.unique(pos).size == pos.size)
    if not moved_only:
        raise PorterError(f"{plan.gguf_name}: its transform computes new values (not only moves them), so the "
                          "GGUF's weights cannot be mapped back onto the checkpoint; compare against the "
                          "checkpoint's own weights instead")
    return pos.astype(np.int64).reshape(-1), sizes


def checkpoint_with_gguf_weights(model_dir: str | Path, plan, gguf_path: str | Path, out_dir: str | Path) -> list[str]:
    """Write into ``out_dir`` a copy of the checkpoint ``model_dir`` (config, tokenizer files, one
    float32 safetensors file) whose weights are the values ``gguf_path`` stores, mapped back
    through ``plan`` (the plan the GGUF was written from). transformers loads the copy as usual,
    with its own renames and expert fusion. Returns the GGUF tensors that were not F32 (the ones
    whose values changed)."""
    import shutil

    from gguf import GGMLQuantizationType, quants
    from safetensors.numpy import save_file

    from porter.convert.checkpoint import Checkpoint
    from porter.convert.quantize import open_gguf

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = {t.name: t for t in open_gguf(Path(gguf_path)).tensors}  # every shard of a split file
    changed = []
    with Checkpoint(model_dir) as ckpt:
        weights = {name: ckpt.read_f32(name) for name in ckpt.names()}
    shapes = {name: w.shape for name, w in weights.items()}
    for tp in plan.tensors:
        t = stored.get(tp.gguf_name)
        if t is None or t.tensor_type == GGMLQuantizationType.F32 or not tp.sources:
            continue
        values = quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        where, sizes = _source_positions(tp, shapes)
        if where.size != values.size:
            raise PorterError(f"{tp.gguf_name}: {values.size} values stored, the plan maps {where.size}")
        flat = np.concatenate([weights[s].reshape(-1) for s in tp.sources])
        flat[where] = values
        for s, chunk in zip(tp.sources, np.split(flat, np.cumsum(sizes)[:-1])):
            weights[s] = chunk.reshape(shapes[s])
        changed.append(tp.gguf_name)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return changed
