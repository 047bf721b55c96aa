"""The contract between architecture plugins and the GGUF writer.

A plugin looks at a checkpoint and returns a :class:`ConversionPlan`: the GGUF architecture name,
the architecture's metadata keys, one :class:`TensorPlan` per GGUF tensor (which checkpoint
parameters it is made from, and how), and porter's graph spec. The writer
(:func:`porter.convert.writer.write_gguf`) does everything else: reading the checkpoint tensor by
tensor, choosing each tensor's storage type for the requested output type, the ``general.*`` keys,
and writing the file safely.

Renaming is data: most tensors are ``TensorPlan("blk.3.attn_q.weight",
["model.layers.3.self_attn.q_proj.weight"])``. A ``transform`` is only for real changes (permuting
q/k rows for llama.cpp's rope layout, fusing several parameters into one tensor, adding 1 to a
Gemma norm), or for a tensor made from nothing in the checkpoint (``sources=[]``, e.g. llama 3's
rope frequency factors: the transform is called with an empty list). Transforms receive float32
numpy arrays, one per source, in the order of ``sources``, and return one array. They must not modify their inputs in place, and should be plain numpy so the
writer can work out the result's shape before reading any weight (it calls them once on zero-cost
stand-ins of the right shapes; a transform that cannot run on those is called on the real data
instead, which costs one extra pass over its sources). A transform that returns its single input
itself (``return arrays[0]``) is recognised as a plain rename on the stand-ins and then streamed a
block of rows at a time, like ``transform=None``.

Metadata values (``kv``) are written with these GGUF types: ``bool`` -> BOOL, ``int`` -> UINT32
(INT32 if negative, UINT64 if too large), ``float`` -> FLOAT32, ``str`` -> STRING, ``bytes`` ->
array of UINT8, a list/tuple of ``int`` -> array of INT32 (what gguf-py and llama.cpp's
converters write), of ``float`` -> array of FLOAT32, of ``str`` -> array of STRING, of ``bool`` ->
array of BOOL. Give ``(value, gguf.GGUFValueType.X)`` to choose the type yourself; for an array,
``(values, (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.Y))`` chooses the element type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# The key under which the graph spec is stored in the GGUF.
GRAPH_SPEC_KEY = "porter.graph_spec"
# The key under which the checkpoint's full tokenizer.json text is stored.
TOKENIZER_JSON_KEY = "porter.tokenizer_json"
# Every id that ends generation (eos, generation_config's list); llama.cpp has no key for the set.
EOG_TOKEN_IDS_KEY = "porter.eog_token_ids"


@dataclass
class TensorPlan:
    gguf_name: str  # e.g. "blk.3.attn_q.weight"
    sources: list[str]  # HF parameter names read (usually one; several when fusing)
    transform: Callable[[list[np.ndarray]], np.ndarray] | None = None  # None: identity of the single source
    keep_f32: bool = False  # norms, biases, 1-D tensors, etc. stay F32 whatever the outtype

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        else:
            self.sources = list(self.sources)
        if not self.gguf_name:
            raise ValueError("TensorPlan needs a gguf_name")
        if not self.sources and self.transform is None:
            # a tensor computed from the config alone (llama3's rope_freqs.weight) has a
            # transform and no sources
            raise ValueError(f"TensorPlan {self.gguf_name!r} has neither sources nor a transform")
        if self.transform is None and len(self.sources) != 1:
            raise ValueError(
                f"TensorPlan {self.gguf_name!r} reads {len(self.sources)} sources but has no "
                "transform to combine them"
            )


@dataclass
class ConversionPlan:
    gguf_arch: str  # "llama"
    kv: dict[str, object]  # architecture keys, e.g. {"llama.block_count": 30, ...}
    tensors: list[TensorPlan]
    spec_json: str  # porter's graph spec, stored under key "porter.graph_spec"
    name: str = ""  # general.name
    # Checkpoint tensors left out on purpose (name fragments, e.g. "pooler."): not reported unused.
    ignored: tuple[str, ...] = ()

    def tensor_names(self) -> list[str]:
        return [t.gguf_name for t in self.tensors]

    def source_names(self) -> set[str]:
        return {s for t in self.tensors for s in t.sources}


__all__ = ["ConversionPlan", "EOG_TOKEN_IDS_KEY", "GRAPH_SPEC_KEY", "TOKENIZER_JSON_KEY", "TensorPlan"]
