"""Reading a porter GGUF: its graph spec, metadata and weights, uploaded into ggml buffers.

The file is memory-mapped (:mod:`porter.runtime.gguf_file`): metadata is decoded key by key and
tensor bytes go from the map straight into ggml's buffers. Quantized matrices that ggml can
repack go to the CPU_REPACK buffer (faster products); BF16 matrices used only by products and
row lookups are held as F16 when their values fit (see :func:`load_gguf`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from porter.errors import ModelError
from porter.runtime import hugepages, repack
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Backend, Buffer, Context, _track, available_memory, set_data
from porter.runtime.gguf_file import GGUFFile
from porter.runtime.types import GGMLType
from porter.spec import Node, Repeat, Spec, expr, loads

SPEC_KEY = "porter.graph_spec"
TOKENIZER_KEY = "porter.tokenizer_json"
EOG_KEY = "porter.eog_token_ids"  # every end-of-generation id (llama.cpp has no key for the set)


def _field_value(reader, key: str, default=None):
    return reader.get(key, default)


def _stock_tokenizer(reader: GGUFFile) -> dict:
    """``tokenizer_json`` rebuilt from llama.cpp's vocabulary keys (cached: porter.runtime.spec_cache),
    or ``tokenizer_problem`` saying why it cannot be."""
    from porter.runtime import spec_cache
    from porter.runtime.ggml_vocab import VocabUnsupported, tokenizer_json

    key = spec_cache.key_of(reader.header())
    hit = spec_cache.load(key, "tokenizer", {"tokenizer_json": str})
    if hit is not None:
        return {"tokenizer_json": hit["tokenizer_json"]}
    try:
        found = {"tokenizer_json": tokenizer_json(reader)}
    except VocabUnsupported as exc:
        return {"tokenizer_problem": str(exc)}
    spec_cache.store(key, "tokenizer", found)
    return found


@dataclass
class LoadedGGUF:
    """What :func:`load_gguf` read: everything a :class:`~porter.runtime.model.Model` is built from."""

    spec: Spec
    metadata: dict
    backend: Backend
    weight_ctx: Context
    weight_buffer: Buffer
    weights: dict
    repack_ctx: Context
    repack_buffer: Buffer | None
    repacked: list[str] = field(default_factory=list)
    bf16_as_f16: list[str] = field(default_factory=list)
    mapped: "MappedWeights | None" = None
    placed: dict = field(default_factory=dict)  # weight name -> the device that holds it, with --rpc
    migration: "hugepages.Migration | None" = None  # the weights' move onto huge pages (stop before freeing)


class MappedWeights:
    """Weights that ggml reads in place from the memory-mapped file (no copy at load; pages come
    in from the page cache when first used), as llama.cpp does with its default ``mmap``. A split
    file gets one ggml buffer per shard, over that shard's map."""

    def __init__(self, reader: GGUFFile, ctx: Context):
        self.reader, self.ctx = reader, ctx
        self.ptrs = []
        self._finalizers = []
        for shard in reader.shards:
            if not any(t.shard == len(self.ptrs) for t in reader.tensors.values()):
                self.ptrs.append(None)  # a shard without tensors (gguf-split's --no-tensor-first-split)
                continue
            ptr = lib.ggml_backend_cpu_buffer_from_ptr(shard.pointer(), shard.mapped_size)
            if ptr == ffi.NULL:
                raise MemoryError(f"ggml could not wrap the mapped GGUF file {shard.path} in a buffer")
            lib.ggml_backend_buffer_set_usage(ptr, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            self.ptrs.append(ptr)
            self._finalizers.append(_track(self, "buffer", lib.ggml_backend_buffer_free, ptr))

    def place(self, t, info) -> None:
        """Point tensor ``t`` at its data (``info``: the file's TensorInfo) in its shard's map."""
        shard = self.reader.shards[info.shard]
        status = lib.ggml_backend_tensor_alloc(self.ptrs[info.shard], t, shard.pointer() + info.offset)
        if status != lib.GGML_STATUS_SUCCESS:
            raise MemoryError("ggml could not place a weight in the mapped file")

    def spans(self, infos) -> list[tuple[int, int]]:
        """(address, size) spans of the map holding ``infos`` (TensorInfo), neighbours merged."""
        ranges = []
        for i, shard in enumerate(self.reader.shards):
            mine = [(t.offset, t.nbytes) for t in infos if t.shard == i and t.nbytes > 0]
            if mine:
                base = int(ffi.cast("uintptr_t", shard.pointer()))
                ranges += hugepages.spans((base + offset, n) for offset, n in mine)
        return ranges

    @property
    def nbytes(self) -> int:
        return self.reader.size

    def close(self) -> None:
        for finalize in self._finalizers:
            finalize()
        self.ctx.close()
        self.reader.close()


def load_gguf(path: str | Path, *, n_threads: int | None = None, use_repack: bool = True,
              bf16_as_f16: bool = True, use_mmap: bool = True, backend=None,
              huge_pages: bool | None = None) -> LoadedGGUF:
    """Read a GGUF (porter's, or a stock llama.cpp file) and upload its weights; for a split file
    ``path`` is its first shard (``NAME-00001-of-00003.gguf``), the others are found beside it.

    ``use_mmap``: weights that need no conversion (neither repacked nor BF16 -> F16) stay in the
    memory-mapped file, which the returned ``mapped`` keeps open; otherwise all are copied.

    ``huge_pages`` (default :func:`porter.runtime.hugepages.default`): the weights every token
    reads move onto 2 MiB pages in the background (the returned ``migration``;
    :mod:`porter.runtime.hugepages`).

    ``bf16_as_f16``: ggml's BF16 matrix product rounds the activations to bfloat16 (8-bit
    significand), which alone costs logits NMSE ~1e-4 on SmolLM2. BF16 matrices whose values
    all fit float16 (normal ones convert exactly, float16-subnormal ones move by at most
    2**-25) are held as F16 instead: same size, same weights, activations rounded to float16.

    ``backend``: a :class:`porter.runtime.sched.SplitBackend` places each layer's weights on its
    device (remote ones are copied there, never repacked or mapped); default: a new CPU backend.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    reader = GGUFFile(path)
    try:
        loaded = _load(reader, path, n_threads, use_repack, bf16_as_f16, use_mmap, backend,
                       hugepages.default() if huge_pages is None else huge_pages)
    except BaseException:
        reader.close()
        raise
    if loaded.mapped is None:
        reader.close()
    return loaded


def _load(reader: GGUFFile, path: Path, n_threads, use_repack: bool, bf16_as_f16: bool,
          use_mmap: bool, backend=None, huge_pages: bool = False) -> LoadedGGUF:
    text = _field_value(reader, SPEC_KEY)
    rebuilt = None
    if text is None:  # a stock llama.cpp file: its plugin renders the spec from the file's keys
        from porter.runtime.stock import rebuild_spec

        rebuilt = rebuild_spec(reader, path)
        spec = rebuilt.spec
    elif not isinstance(text, str):
        raise ModelError(f"{path}: {SPEC_KEY} is not a string; convert the model again")
    else:
        spec = loads(text)
    check_hparams(spec, path, len(reader.tensors))
    check_attrs(spec, path)
    arch = _field_value(reader, "general.architecture")
    metadata = {
        "architecture": arch,
        "name": _field_value(reader, "general.name"),
        "context_length": _field_value(reader, f"{arch}.context_length"),
        "tokenizer_json": _field_value(reader, TOKENIZER_KEY),
        # where the graph spec came from: the file, or the plugin that rebuilt it from llama.cpp's keys
        "spec_source": "file" if rebuilt is None else f"rebuilt by {rebuilt.model_type}",
        "chat_template": _field_value(reader, "tokenizer.chat_template"),
        "bos_token_id": _field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field_value(reader, "tokenizer.ggml.eos_token_id"),
        **{f"{t}_token_id": _field_value(reader, f"tokenizer.ggml.{key}_token_id")
           for t, key in (("unk", "unknown"), ("sep", "seperator"), ("pad", "padding"), ("cls", "cls"),
                          ("mask", "mask"), ("eot", "eot"), ("eom", "eom"))},
        "eog_token_ids": _field_value(reader, EOG_KEY),
        # absent from a stock SentencePiece file, it means yes (llama.cpp's SPM default)
        "add_bos_token": _field_value(reader, "tokenizer.ggml.add_bos_token",
                                      True if reader.get("tokenizer.ggml.model") == "llama" else None),
        "file_type": _field_value(reader, "general.file_type"),
        "pooling": _field_value(reader, "porter.pooling"),  # encoders: mean | cls | last | none
        "normalize": _field_value(reader, "porter.normalize"),
    }
    if metadata["tokenizer_json"] is None and "tokenizer.ggml.tokens" in reader.keys():
        metadata.update(_stock_tokenizer(reader))
    expected = {w: None for w in spec.weight_names()}
    backend = Backend(n_threads) if backend is None else backend
    # weights another device holds (SplitBackend): name -> that device's buffer type
    remote = {}
    if hasattr(backend, "placement"):
        for name in expected:
            buft = backend.placement(spec, name, layer_pattern(spec, name) != name)
            if buft is not None:
                remote[name] = buft
    by_name = reader.tensors
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise ModelError(f"{path}: tensors the graph needs are missing: {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    inline = {w.name: np.asarray(w.data, dtype=np.float32).reshape([int(d) for d in w.shape])
              for w in spec.weights if w.data is not None}  # shapes checked by porter.spec.check
    for name in expected:
        if by_name[name].nbytes < 0:
            raise ModelError(f"{path}: tensor {name} has ggml type {by_name[name].type}, which this ggml "
                             "cannot hold (or a row that does not fit its blocks)")
    check_weights(spec, by_name, path)
    patterns = repack.matmul_only_weights(spec) if use_repack else set()
    experts = repack.expert_only_weights(spec) if use_repack else set()
    to_repack = set()
    for name in expected:
        rt, pattern = by_name[name], layer_pattern(spec, name)
        if name in remote:
            continue
        if ((pattern in patterns and len(rt.ne) == 2 and repack.supports(rt.type, *rt.ne))
                or (pattern in experts and len(rt.ne) == 3 and repack.supports(rt.type, *rt.ne))):
            to_repack.add(name)
    as_f16 = set()
    if bf16_as_f16:
        f16_ok = repack.weights_used_only_as(spec, {("mul_mat", 0), ("get_rows", 0), ("mul_mat_id", 0)})
        for name in expected:
            rt = by_name[name]
            if (rt.type == int(GGMLType.BF16) and layer_pattern(spec, name) in f16_ok
                    and _bf16_fits_f16(np.frombuffer(reader.data(name), dtype=np.uint16))):
                as_f16.add(name)
    in_place = {n for n in expected if n not in to_repack and n not in as_f16 and n not in remote} if use_mmap else set()
    ctx = Context(len(expected) - len(to_repack) - len(in_place) - len(remote) + len(inline) + 1)
    remote_ctx = {}  # one context (and buffer) per remote buffer type
    for buft in remote.values():
        key = int(ffi.cast("uintptr_t", buft))
        if key not in remote_ctx:
            remote_ctx[key] = (buft, Context(sum(1 for b in remote.values() if b == buft)))
    rctx = Context(max(1, len(to_repack)))
    mctx = Context(max(1, len(in_place)))
    weights = {}
    # in the file's order, so that tensors next to each other there are next to each other in the
    # copied and repacked buffers too (porter.runtime.fusion multiplies such neighbours as one)
    for name in sorted(expected, key=lambda n: (by_name[n].shard, by_name[n].offset)):
        rt = by_name[name]
        ne = list(rt.ne)
        gtype = GGMLType.F16 if name in as_f16 else _gtype(rt.type)
        home = rctx if name in to_repack else (mctx if name in in_place else ctx)
        if name in remote:
            home = remote_ctx[int(ffi.cast("uintptr_t", remote[name]))][1]
        weights[name] = home.new_tensor(gtype, ne, name)
    for name, values in inline.items():
        weights[name] = ctx.new_tensor(GGMLType.F32, list(reversed(values.shape)), name)
    if lib.ggml_get_first_tensor(ctx.ptr) == ffi.NULL:  # ggml allocates no buffer for no tensors
        ctx.new_tensor(GGMLType.F32, [1], "porter.placeholder")
    buffer = Buffer(ctx, backend.buffer_type)
    rbuffer = Buffer(rctx, repack.repack_buffer_type()) if to_repack else None
    mapped = MappedWeights(reader, mctx) if in_place else None
    placed = {}
    if remote:
        # the scheduler runs an op where its weights are: every weight buffer says it holds weights
        for b in (buffer, rbuffer):
            if b is not None:
                lib.ggml_backend_buffer_set_usage(b.ptr, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        for buft, rc in remote_ctx.values():
            rb = Buffer(rc, buft, f"the weights on {ffi.string(lib.ggml_backend_buft_name(buft)).decode()}")
            lib.ggml_backend_buffer_set_usage(rb.ptr, lib.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            backend.own(rb, rc)
        placed = {n: ffi.string(lib.ggml_backend_buft_name(b)).decode() for n, b in remote.items()}
    if mapped is None:
        mctx.close()
    for name in in_place:
        mapped.place(weights[name], by_name[name])
    for name, values in inline.items():
        set_data(weights[name], values)
    for name in expected:
        if name in in_place:
            continue
        t = weights[name]
        raw = reader.data(name)
        data = _bf16_as_f16(np.frombuffer(raw, dtype=np.uint16)) if name in as_f16 else raw
        nbytes = int(lib.ggml_nbytes(t))
        if data.nbytes != nbytes:
            raise ModelError(f"{path}: tensor {name} holds {data.nbytes} bytes, expected {nbytes} (truncated file?)")
        lib.ggml_backend_tensor_set(t, ffi.from_buffer(data), 0, nbytes)
        del raw, data
    migration = None
    if huge_pages:  # last: nothing may fail (and free what it works on) once it runs
        # mapped weights every token reads (not the tables get_rows only picks a few rows of)
        rows_only = repack.weights_used_only_as(spec, {("get_rows", 0)})
        streamed = [by_name[n] for n in in_place if layer_pattern(spec, n) not in rows_only]
        remap = mapped.spans(streamed) if mapped is not None else []
        free = available_memory()
        if free is not None and sum(n for _, n in remap) > free // 2:
            remap = []  # the copies would crowd out the page cache (and all else): the map stays as it is
        anonymous = [b for b in (buffer, rbuffer) if b is not None]
        migration = hugepages.Migration.start(owner=(reader, anonymous), remap=remap,
                                              collapse=hugepages.buffer_ranges(anonymous))
    return LoadedGGUF(spec, metadata, backend, ctx, buffer, weights, rctx, rbuffer,
                      sorted(to_repack), sorted(as_f16), mapped, placed, migration)


# hparams that count or size something (an int, or a per-layer list of ints) and those that scale
# (a finite number, or a list of them); any hparam a weight's shape refers to is a size as well
_COUNTS = re.compile(r"^(n_|head_dim$|rope_n_|rope_mode$|sliding_window$|kv_width_|state_width_)")
_REALS = re.compile(r"(eps|scale|factor|softcap|freq_base|beta_fast|beta_slow)$")
_INT_TYPES = (GGMLType.I8, GGMLType.I16, GGMLType.I32, GGMLType.I64, GGMLType.F64)
# no real size comes near it, and sizes below it cannot overflow ggml's byte counts when multiplied
_MAX_SIZE = 2**31
# node attributes the interpreter hands ggml as floats: numbers (infinities pass: a traced graph
# may scale by one), and what some ops need besides (ggml asserts eps >= 0, which NaN fails; a
# soft cap divides by cap)
_FLOAT_ATTRS = re.compile(r"^(s|bias|cap|max_bias)$|" + _REALS.pattern)
_ATTR_RULES = {"eps": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
               "cap": (lambda v: v != 0, "a non-zero number")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def check_hparams(spec: Spec, path, n_tensors: int) -> None:
    """Refuse hparams of the wrong type or beyond what the file can hold, before anything is built
    (a layer count of 2**63-1 would otherwise expand weight names until memory runs out)."""
    hp = spec.hparams
    sizes = {name for w in spec.weights for d in w.shape if expr.is_reference(d) for name, _ in expr.references(d)}
    sizes.add("n_vocab")  # a size even where the shapes state it as a number
    loop = spec.layer_loop
    for key, value in hp.items():
        items = value if isinstance(value, list) else [value]
        if key in sizes or _COUNTS.match(key):
            limit = None if loop is not None and key == loop.repeat else _MAX_SIZE  # bounded by the file below
            if (not all(_is_int(v) and v >= 0 and (limit is None or v < limit) for v in items)
                    or (key in sizes and not all(v > 0 for v in items))):
                raise ModelError(f"{path}: spec hparam {key} = {value!r} is not a {'positive' if key in sizes else 'non-negative'} "
                                 f"integer{' below 2**31' if limit else ''}; the file is damaged: convert the model again")
        elif _REALS.search(key) and not all(_is_real(v) for v in items):
            raise ModelError(f"{path}: spec hparam {key} = {value!r} is not a finite number; "
                             "the file is damaged: convert the model again")
    if loop is None:
        return
    n_layer = hp[loop.repeat]
    per_layer = any(w.layered and w.layers is None for w in spec.weights)
    bound = n_tensors if per_layer else 4096
    if not _is_int(n_layer) or not 0 <= n_layer <= bound:
        raise ModelError(f"{path}: spec hparam {loop.repeat} = {n_layer!r} is not a layer count this file can hold "
                         f"(0..{bound}{', its number of tensors' if per_layer else ''}); convert the model again")
    for w in spec.weights:
        if w.layers is not None and not all(_is_int(i) and 0 <= i < n_layer for i in w.layers):
            raise ModelError(f"{path}: weight {w.name} lists layers outside 0..{n_layer - 1}; convert the model again")
    for node in loop.body:
        for value in [*node.attrs.values(), node.when, *node.inputs]:
            for v in value if isinstance(value, list) else [value]:
                for name, indexed in (expr.references(v) if expr.is_reference(v) and v != "$carry" else ()):
                    if indexed and len(hp[name]) < n_layer:
                        raise ModelError(f"{path}: spec hparam {name} lists {len(hp[name])} layers, "
                                         f"{loop.repeat} is {n_layer}; convert the model again")


def check_attrs(spec: Spec, path) -> None:
    """Every float attribute of a node, resolved in each layer, is a number the op can take
    (ggml would abort on some, Python would raise a raw TypeError on others)."""
    hp = spec.hparams
    n_layer = int(hp[spec.layer_loop.repeat]) if spec.layer_loop else 0
    for item in spec.graph:
        body, layers = (item.body, range(n_layer)) if isinstance(item, Repeat) else ([item], [None])
        for node in body:
            checked = [(k, v) for k, v in node.attrs.items() if _FLOAT_ATTRS.search(k)]
            for layer in layers if checked else ():
                for key, raw in checked:
                    _check_attr(node, layer, key, raw, hp, path)


def _check_attr(node, layer, key: str, raw, hp: dict, path) -> None:
    try:
        value = expr.evaluate(raw, lambda name, per_layer: hp[name][layer] if per_layer else hp[name]) \
            if expr.is_reference(raw) else raw
    except (KeyError, IndexError, TypeError):
        return  # runtime symbols (n_tokens...), or not resolvable here: the interpreter reports it
    rule, wanted = _ATTR_RULES.get(key, (lambda v: True, "a number"))
    if not ((_is_int(value) or isinstance(value, float)) and rule(value)):
        name = node.name.format(L=layer) if layer is not None else node.name
        source = f" ({raw})" if expr.is_reference(raw) else ""
        raise ModelError(f"{path}: node {name}: {key} = {value!r}{source} is not {wanted}; "
                         "the file is damaged: convert the model again")


def _shape(shape) -> tuple[int, ...]:
    """A numpy-order shape without leading ones (ggml drops trailing ones of ne)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def check_weights(spec: Spec, by_name: dict, path) -> None:
    """Every weight the graph reads has the shape the spec states (its size expressions evaluated
    with the spec's hparams), no empty dimension, and a type ggml's products and lookups take."""
    hp = spec.hparams
    n_layer = int(hp[spec.layer_loop.repeat]) if spec.layer_loop else 0

    def lookup(name, per_layer):
        return hp[name][layer] if per_layer else hp[name]

    for w in spec.weights:
        if w.data is not None:
            continue
        layers = (w.layers if w.layers is not None else range(n_layer)) if w.layered else [None]
        for layer in layers:
            name = w.name.format(L=layer) if w.layered else w.name
            rt = by_name[name]
            found = tuple(reversed(rt.ne))
            if 0 in found:
                raise ModelError(f"{path}: tensor {name} has an empty dimension (shape {list(found)}); "
                                 "convert the model again")
            if rt.type in _INT_TYPES:
                raise ModelError(f"{path}: tensor {name} has type {GGMLType(rt.type).name}, not a float or "
                                 "quantized type; convert the model again")
            try:
                want = tuple(expr.evaluate(d, lookup) if expr.is_reference(d) else d for d in w.shape)
            except (KeyError, IndexError, TypeError):
                continue  # sizes that need runtime symbols: the ops check them
            if not all(_is_int(d) for d in want) or _shape(found) != _shape(want):
                raise ModelError(f"{path}: tensor {name} has shape {list(found)}, the graph spec expects "
                                 f"{list(want)}; the file is damaged or inconsistent: convert the model again")


def index_tables(spec: Spec, kind: str) -> list[str]:
    """Weights a ``get_rows`` node indexes with the graph input of ``kind`` (its ids must stay
    below their rows: ggml aborts past them)."""
    names = {i.name for i in spec.inputs if i.kind == kind}
    nodes = [n for item in spec.graph for n in (item.body if isinstance(item, Repeat) else [item])]
    return [n.inputs[0] for n in nodes if isinstance(n, Node) and n.op == "get_rows" and n.inputs[1] in names]


def _gtype(type_id: int):
    try:
        return GGMLType(type_id)
    except ValueError:  # a type porter has no name for: ggml still knows its geometry
        return type_id


def layer_pattern(spec: Spec, name: str) -> str:
    """The spec's name for a weight: blk.3.attn_q.weight -> blk.{L}.attn_q.weight when the spec
    declares it per layer (the layer index is the first number of the name)."""
    pattern = re.sub(r"(^|\.)(\d+)\.", r"\1{L}.", name, count=1)
    return pattern if pattern != name and any(w.layered and w.name == pattern for w in spec.weights) else name


def _bf16_values(raw: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_fits_f16(raw: np.ndarray) -> bool:
    """Whether every BF16 value converts to float16: finite and at most float16's largest, 65504.
    Normal bfloat16 values then convert exactly; float16-subnormal ones move by at most 2**-25."""
    return bool(np.all(np.abs(_bf16_values(raw)) <= np.finfo(np.float16).max))  # NaN compares False


def _bf16_as_f16(raw: np.ndarray) -> np.ndarray:
    """BF16 bits as float16 (for tensors that pass :func:`_bf16_fits_f16`)."""
    return _bf16_values(raw).astype(np.float16)
