"""Writing a GGUF from a checkpoint and a :class:`~porter.convert.plan.ConversionPlan`, streaming.

Memory: every tensor's GGUF shape and storage type are worked out before any weight is read (the
shapes from the safetensors headers; a transform is run once on zero-cost stand-ins, see
``plan.py``), so the GGUF header, metadata and tensor table are written first and the tensors then
follow one at a time: read (plain reads, no memory map), converted to float32, checked for
NaN/Inf, transformed, converted to the storage type, written, dropped. Peak memory is the Python
process plus a few copies of the largest tensor, not the model.

Storage types, following llama.cpp:

- ``keep_f32`` tensors, 1-D tensors and ``*_norm.weight`` stay F32 whatever ``outtype`` says
  (``convert_hf_to_gguf.py``: "except 1d tensors").
- A row length that is not a multiple of the type's block size falls back as ``llama-quantize``
  does: Q4_K -> Q5_0, Q6_K -> Q8_0, and any other type (or a fallback that still does not fit)
  -> F16 (``convert_hf_to_gguf.py`` falls back to F16 for Q8_0). SmolLM2's 576-wide rows, for
  instance, are not multiples of the 256 of the K-quants. Each fallback is listed in the report.
- Unless ``pure=True``: with a type below 8 bits (q4_0, q4_1, q5_0, q5_1, q4_k), the output
  projection (``output.weight``, or ``token_embd.weight`` when the embeddings are tied and there
  is no ``output.weight``) is stored as Q6_K, or Q8_0 when its rows do not fit Q6_K, as
  ``llama-quantize`` does for every such file type. Beyond that, porter's q4_k is uniform (it
  does not raise attn_v/ffn_down of some layers to Q5_K/Q6_K as llama.cpp's Q4_K_M/S do) and is
  labelled ``MOSTLY_Q4_K_S``, its nearest llama.cpp file type (``porter quantize`` applies
  llama.cpp's mixes to an f32/f16/bf16 GGUF: ``porter/convert/quantize.py``).
- F16 cannot hold magnitudes above 65504: such values are clamped, with a warning in the report.

Quantization goes through ``porter.runtime.quant.quantize_into`` (ggml's block layout: gguf-py's
quantizers for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and BF16, bit-identical to ggml, and
``ggml_quantize_chunk`` for the K-quants); if that module is missing, the same two directly.

Safety: the file is written under a temporary name in the output directory and renamed into place
at the end; on any error or interrupt the temporary file is removed and an existing output is left
untouched. An existing output is refused unless ``force``.

Split files (``split_max_size``, ``split_max_tensors``): gguf-py's ``GGUFWriter`` decides the
shards as ``convert_hf_to_gguf.py --split-max-size`` does (a new shard when the next tensor would
take the current one's tensor bytes past the limit, or its tensor count to the maximum; a tensor is
never cut; at least one tensor per shard) and writes the metadata into the first shard and
``split.no``/``split.count``/``split.tensors.count`` into every one; the names are
``NAME-00001-of-00003.gguf`` beside ``NAME.gguf``. Every shard is written under a temporary name and
renamed only when all of them are complete.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import math
import os
import re
import resource
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType as QT,
    GGUFValueType as VT,
    GGUFWriter,
    LlamaFileType,
)
from gguf.gguf_writer import WriterState

from porter.convert.checkpoint import Checkpoint
from porter.convert.plan import GRAPH_SPEC_KEY, ConversionPlan, TensorPlan
from porter.errors import ModelError, PorterError

# outtype -> (storage type of ordinary weights, llama.cpp file type recorded in general.file_type)
OUTTYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (QT.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (QT.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q4_k": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q6_k": (QT.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
# llama-quantize's substitutes when a row does not fit a K-quant's 256-element super-block.
_ROW_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
# Types whose output projection llama-quantize raises to Q6_K (or Q8_0).
_LOW_BIT = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K}
# Checkpoint entries that are buffers, not weights, and are never needed.
IGNORABLE_TENSORS = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)position_ids$"),
    re.compile(r"(^|\.)attn\.(masked_)?bias$"),
    re.compile(r"(^|\.)num_batches_tracked$"),
)
F16_MAX = float(np.finfo(np.float16).max)
# Largest magnitude a block format holds before its float16 scale (amax / levels, or the block's
# minimum for the _1 types) overflows to infinity.
_SCALE_LIMITS = {QT.Q8_0: 127 * F16_MAX, QT.Q4_0: 8 * F16_MAX, QT.Q5_0: 16 * F16_MAX,
                 QT.Q4_1: F16_MAX, QT.Q5_1: F16_MAX}
# Rows are read, converted and quantized in blocks of about this many elements (4 MiB as float32).
CHUNK_ELEMENTS = 2**20


@dataclass
class TypeChange:
    tensor: str
    wanted: str
    used: str
    reason: str

    def __str__(self) -> str:
        return f"{self.tensor}: {self.wanted} -> {self.used} ({self.reason})"


@dataclass
class Shard:
    path: Path
    n_tensors: int
    tensor_bytes: int

    def __str__(self) -> str:
        size = f"{self.tensor_bytes / 2**20:.1f} MiB" if self.tensor_bytes >= 2**20 else f"{self.tensor_bytes / 2**10:.1f} KiB"
        return f"{self.path.name}: {self.n_tensors} tensor{'s' if self.n_tensors != 1 else ''}, {size}"


@dataclass
class WriteReport:
    out: Path
    outtype: str
    file_type: int  # llama.cpp's LlamaFileType
    n_tensors: int
    bytes_written: int
    seconds: float
    peak_rss: int  # bytes, process high-water mark at the end
    peak_rss_delta: int  # bytes the high-water mark rose during the conversion (0: set earlier)
    tensor_types: dict[str, str] = field(default_factory=dict)
    fallbacks: list[TypeChange] = field(default_factory=list)  # row length does not fit the type
    mixed: list[TypeChange] = field(default_factory=list)  # deliberate llama.cpp-style upgrades
    unused_tensors: list[str] = field(default_factory=list)  # in the checkpoint, not in the plan
    warnings: list[str] = field(default_factory=list)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    general: dict[str, object] = field(default_factory=dict)  # general.name, basename, size_label, ...
    dry_run: bool = False  # nothing was written: bytes_written is what the file would hold
    vocab_only: bool = False
    shards: list[Shard] = field(default_factory=list)  # the files written (one unless split)

    def summary(self) -> str:
        what = f"{self.n_tensors} tensors, {self.outtype}" if not self.vocab_only else "vocabulary only, no tensors"
        if self.dry_run:
            lines = [f"{'tensor':40s} {'shape':>18s} {'type':>5s} {'MiB':>9s}"]
            lines += [f"{name:40s} {'x'.join(map(str, self.tensor_shapes[name])):>18s} {qtype:>5s} "
                      f"{self.tensor_bytes[name] / 2**20:9.2f}" for name, qtype in self.tensor_types.items()]
            lines.append(f"dry run: would write {self.out} ({self.bytes_written / 2**20:.1f} MiB of tensor data, {what}; "
                         f"{self.general.get('general.name', '')} {self.general.get('general.size_label', '')})"
                         f"{f' in {len(self.shards)} shards' if len(self.shards) > 1 else ''}; nothing written")
        else:
            split = f" in {len(self.shards)} shards" if len(self.shards) > 1 else ""
            lines = [f"wrote {self.out} ({self.bytes_written / 2**20:.1f} MiB{split}, {what}) in {self.seconds:.1f} s, "
                     f"peak memory {self.peak_rss / 2**20:.0f} MiB"]
        if len(self.shards) > 1:
            lines += [f"  shard {i}/{len(self.shards)} {shard}" for i, shard in enumerate(self.shards, 1)]
        lines += _grouped("fallback", self.fallbacks)
        lines += _grouped("mixed", self.mixed)
        if self.unused_tensors:
            lines.append(f"unused checkpoint tensors: {', '.join(self.unused_tensors)}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _grouped(label: str, changes: list[TypeChange]) -> list[str]:
    """Type changes in one line (``--dry-run`` shows each tensor's type), not one per tensor: a
    q4_k SmolLM2 has 180 fallbacks of the same kind."""
    if len(changes) <= 2:
        return [f"{label}: {c}" for c in changes]
    kinds: dict[tuple[str, str, str], int] = {}
    for c in changes:
        kinds[(c.wanted, c.used, c.reason)] = kinds.get((c.wanted, c.used, c.reason), 0) + 1
    parts = [f"{n} {wanted} -> {used} ({reason})" for (wanted, used, reason), n in kinds.items()]
    return [f"{label}: {len(changes)} tensors: {'; '.join(parts)}; --dry-run lists them"]


@dataclass
class _Item:
    plan: TensorPlan
    shape: tuple[int, ...]
    qtype: QT
    nbytes: int
    rename: bool  # the data is the single source's, unchanged: read it a block of rows at a time


# ----------------------------------------------------------------------------- metadata values
def _scalar_type(value: Any) -> VT:
    if isinstance(value, (bool, np.bool_)):
        return VT.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if v < 0:
            return VT.INT32 if v >= -(2**31) else VT.INT64
        return VT.UINT32 if v < 2**32 else VT.UINT64
    if isinstance(value, (float, np.floating)):
        return VT.FLOAT32
    if isinstance(value, str):
        return VT.STRING
    raise TypeError(f"unsupported value {value!r} of type {type(value).__name__}")


def _array_type(values: Sequence[Any]) -> VT:
    kinds = {_scalar_type(v) for v in values}
    if kinds <= {VT.BOOL}:
        return VT.BOOL
    if kinds <= {VT.UINT32, VT.INT32, VT.UINT64, VT.INT64}:
        lo, hi = min(int(v) for v in values), max(int(v) for v in values)
        return VT.INT32 if -(2**31) <= lo and hi < 2**31 else VT.INT64
    if kinds <= {VT.UINT32, VT.INT32, VT.UINT64, VT.INT64, VT.FLOAT32}:
        return VT.FLOAT32
    if kinds == {VT.STRING}:
        return VT.STRING
    raise TypeError(f"an array mixes element types {sorted(k.name for k in kinds)}")


_PY = {VT.BOOL: bool, VT.STRING: str, VT.FLOAT32: float, VT.FLOAT64: float}


def _coerce(value: Any, vtype: VT) -> Any:
    conv = _PY.get(vtype, int)
    return value if isinstance(value, (bytes, str)) and vtype == VT.STRING else conv(value)


def kv_entry(key: str, value: Any) -> tuple[Any, VT, VT | None] | None:
    """(value, type, element type) for GGUFWriter.add_key_value; None for an empty array."""
    explicit: Any = None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], (VT, tuple)):
        value, explicit = value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        if isinstance(value, (bytes, bytearray)):
            value, explicit = list(value), explicit or VT.UINT8
        if isinstance(value, (list, tuple)):
            if not value:
                return None
            sub: VT
            if isinstance(explicit, tuple):
                sub = explicit[1]
            elif explicit is not None and explicit != VT.ARRAY:
                sub = explicit
            else:
                sub = _array_type(value)
            return [_coerce(v, sub) for v in value], VT.ARRAY, sub
        vtype = explicit if explicit is not None else _scalar_type(value)
        return _coerce(value, vtype), vtype, None
    except (TypeError, ValueError) as exc:
        raise PorterError(f"metadata key {key!r}: cannot store {value!r:.80} ({exc})") from None


# ----------------------------------------------------------------------------- tensor types
def _block(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def nbytes_of(shape: Sequence[int], qtype: QT) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    n = shape[-1] if shape else 1
    return rows * (n // block) * size


def choose_type(
    name: str, shape: tuple[int, ...], keep_f32: bool, default: QT, *, is_output: bool, pure: bool
) -> tuple[QT, TypeChange | None, TypeChange | None]:
    """(storage type, mixed-precision change or None, row fallback or None) for one tensor."""
    if keep_f32 or len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32, None, None
    n = shape[-1]
    wanted = default
    mixed = None
    if is_output and not pure and default in _LOW_BIT:
        wanted = QT.Q6_K if n % _block(QT.Q6_K) == 0 else QT.Q8_0
        mixed = TypeChange(name, default.name, wanted.name, "output projection kept at higher precision, as llama-quantize does")
    qtype = wanted
    if n % _block(qtype) != 0:
        qtype = _ROW_FALLBACK.get(qtype, QT.F16)
        if n % _block(qtype) != 0:
            qtype = QT.F16
    fallback = None
    if qtype != wanted:
        fallback = TypeChange(
            name, wanted.name, qtype.name,
            f"row length {n} is not a multiple of {wanted.name}'s block size {_block(wanted)}",
        )
    return qtype, mixed, fallback


def _runtime_quant():
    try:
        from porter.runtime import quant
    except ImportError:
        return None
    return quant if hasattr(quant, "quantize_into") else None


def _quantize(arr: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 rows -> the bytes (as an array) ggml stores for ``qtype``."""
    if qtype == QT.F32:
        return arr
    if qtype == QT.F16:
        return arr.astype(np.float16)
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim != 2 else arr
    quant = _runtime_quant()
    if quant is not None:
        from porter.runtime.types import GGMLType

        out = np.empty(nbytes_of(rows.shape, qtype), dtype=np.uint8)
        try:
            # values were checked already (with the checkpoint tensor's name in the message)
            quant.quantize_into(rows, GGMLType(int(qtype)), out, check_finite=False)
            return out
        except (PorterError, NotImplementedError, TypeError, ValueError):
            pass  # a type or signature it does not handle: porter's own fallbacks below
    if qtype in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return _ggml_quantize(rows, qtype)
    import gguf.quants

    return gguf.quants.quantize(rows, qtype)


def _ggml_quantize(rows: np.ndarray, qtype: QT) -> np.ndarray:
    from porter.runtime._lib import ffi, lib

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n = rows.shape
    out = np.empty(nbytes_of(rows.shape, qtype), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype), ffi.from_buffer("float[]", rows), ffi.from_buffer(out), 0, nrows, n, ffi.NULL
    )
    if written != out.nbytes:
        raise PorterError(f"ggml quantized {written} bytes, expected {out.nbytes}")
    return out


# ----------------------------------------------------------------------------- helpers
def _maxrss() -> int:
    """The process's peak resident memory in bytes.

    Linux's VmHWM when available: ``getrusage``'s ``ru_maxrss`` also counts the memory of the
    parent a process was forked or vforked from (it survives ``exec``), so a small process started
    by a big one would report the big one's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _check_finite(arr: np.ndarray, what: str) -> None:
    # A float64 sum cannot overflow for float32 inputs and carries any NaN/Inf through.
    if np.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
        return
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = int(np.count_nonzero(np.isinf(arr)))
    raise ModelError(
        f"{what} contains {n_nan} NaN and {n_inf} infinite values; the checkpoint is damaged "
        "(or was saved after a diverged training step) and cannot be converted"
    )


def _is_ignorable(name: str) -> bool:
    return any(p.search(name) for p in IGNORABLE_TENSORS)


def _probe(t: TensorPlan, ckpt: Checkpoint) -> tuple[tuple[int, ...], bool]:
    """(the shape ``t`` produces, whether it is a plain rename), if possible without reading weights.

    The transform runs on read-only zero-stride stand-ins of the sources' shapes; one that returns
    its single input unchanged is a rename (plugins often route every tensor through one transform
    method that is the identity for most of them), which can then be read a block at a time.
    """
    if t.transform is None:
        return ckpt.shape(t.sources[0]), True
    stand_ins = [np.broadcast_to(np.float32(0), ckpt.shape(s)) for s in t.sources]
    try:
        result = t.transform(stand_ins)
        return tuple(int(d) for d in np.shape(result)), len(stand_ins) == 1 and result is stand_ins[0]
    except Exception:  # noqa: BLE001 - e.g. an in-place op on a read-only stand-in: use real data
        pass
    try:
        result = t.transform([ckpt.read_f32(s) for s in t.sources])
    except Exception as exc:
        raise PorterError(f"the transform for tensor {t.gguf_name!r} failed: {exc!r}") from exc
    return tuple(int(d) for d in np.shape(result)), False


# The shape config.json implies for the usual tensors (numpy order, spec hparam names; a matrix
# may also be stored the other way round, as GPT-2's Conv1D weights are).
_CONFIG_SHAPES = {
    "token_embd.weight": ("n_vocab", "n_embd"), "output.weight": ("n_vocab", "n_embd"),
    "output_norm.weight": ("n_embd",), "attn_norm.weight": ("n_embd",), "ffn_norm.weight": ("n_embd",),
    "attn_q.weight": ("n_embd_q", "n_embd"), "attn_k.weight": ("n_embd_kv", "n_embd"),
    "attn_v.weight": ("n_embd_kv", "n_embd"), "attn_output.weight": ("n_embd", "n_embd_q"),
    "ffn_up.weight": ("n_ff", "n_embd"), "ffn_gate.weight": ("n_ff", "n_embd"), "ffn_down.weight": ("n_embd", "n_ff"),
}


def _check_against_spec(plan: ConversionPlan, items: dict, model_dir: Path) -> None:
    """Every tensor the graph spec reads (every layer's) is planned, with the shape the spec
    computes from the config: a checkpoint inconsistent with its config.json is refused here
    instead of writing a GGUF that does not load or computes something else."""
    if not plan.spec_json:
        return
    from porter.spec import expr, loads

    def _shape(shape):  # leading ones do not count (ggml drops them)
        shape = tuple(shape)
        return shape[1:] if len(shape) > 1 and shape[0] == 1 else shape

    from porter.errors import SpecError

    try:
        spec = loads(plan.spec_json)
    except SpecError:  # not a spec porter reads (a test's stand-in): nothing to compare with
        return
    hp = spec.hparams
    n_layer = int(hp[spec.layer_loop.repeat]) if spec.layer_loop else 0
    problems = []
    for w in spec.weights:
        if w.data is not None:
            continue
        for layer in (w.layers if w.layers is not None else range(n_layer)) if w.layered else [None]:
            name = w.name.format(L=layer) if w.layered else w.name
            item = items.get(name)
            if item is None:
                problems.append(f"{name}: the graph needs it, the checkpoint provides nothing for it")
                continue
            try:
                want = tuple(expr.evaluate(d, lambda n, per: hp[n][layer] if per else hp[n]) if expr.is_reference(d) else d
                             for d in w.shape)
            except (KeyError, IndexError, TypeError):
                continue  # a size known only at run time
            if _shape(item.shape) not in (_shape(want), _shape(want[::-1])):
                sources = ", ".join(item.plan.sources) or "computed"
                problems.append(f"{name} (from {sources}): expected shape {list(want)} from config.json, found "
                                f"{list(item.shape)}")
    for name, item in items.items():
        m = re.match(r"blk\.(\d+)\.(.*)", name)
        layer, role = (int(m.group(1)), m.group(2)) if m else (None, name)
        dims = _CONFIG_SHAPES.get(role)
        if dims is None:
            continue
        values = [hp.get(d) for d in dims]
        values = [v[layer] if isinstance(v, list) and layer is not None and layer < len(v) else v for v in values]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            continue
        want = tuple(values)
        ok = {_shape(want), _shape(want[::-1])}
        if role == "ffn_up.weight" and f"blk.{layer}.ffn_gate.weight" not in items:
            ok |= {(2 * want[0], want[1]), (want[1], 2 * want[0])}  # gate and up fused (phi3)
        if _shape(item.shape) not in ok:
            sources = ", ".join(item.plan.sources) or "computed"
            problems.append(f"{name} (from {sources}): expected shape {list(want)} from config.json "
                            f"({', '.join(dims)}), found {list(item.shape)}")
    try:
        tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings")
    except (OSError, ValueError, AttributeError):
        tied = None
    if (tied is False and "result_output" in spec.outputs and "token_embd.weight" in items
            and "output.weight" not in items):
        problems.append("output.weight: config.json says tie_word_embeddings false, but the checkpoint has no "
                        "lm_head.weight (the output matrix); add it, or set tie_word_embeddings to true")
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ModelError(f"the checkpoint in {model_dir} does not match its config.json "
                         f"({len(problems)} problem(s)):\n  - {shown}\nfix config.json or the checkpoint")


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description:<32}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


# ----------------------------------------------------------------------------- the writer
@dataclass
class WriteOptions:
    force: bool = False
    progress: bool = True
    tokenizer: bool | None = None
    pure: bool = False
    dry_run: bool = False
    vocab_only: bool = False
    model_id: str | None = None  # the hub id the checkpoint came from (names the model)
    out_dir: Path | None = None  # where the conventionally named file goes (default: the current directory)
    split_max_size: int = 0  # bytes of tensor data per shard (0: no limit)
    split_max_tensors: int = 0  # tensors per shard (0: no limit)

    @property
    def split(self) -> bool:
        return bool(self.split_max_size or self.split_max_tensors)


def write_gguf(
    model_dir: Path,
    plan: ConversionPlan,
    out: Path | None,
    outtype: str,
    *,
    force: bool = False,
    progress: bool = True,
    tokenizer: bool | None = None,
    pure: bool = False,
    dry_run: bool = False,
    vocab_only: bool = False,
    model_id: str | None = None,
    out_dir: Path | None = None,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
) -> WriteReport:
    """Write the GGUF that ``plan`` describes for the checkpoint in ``model_dir`` to ``out``
    (``None``: the conventional name, e.g. ``SmolLM2-135M-Instruct-Q8_0.gguf``, in ``out_dir``,
    by default the current directory).

    ``outtype``: one of ``OUTTYPES`` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q6_k).
    ``tokenizer``: add :func:`porter.convert.tokenizer.tokenizer_kv` keys (plan keys win on a
    clash); ``None`` adds them when ``model_dir`` has a ``tokenizer.json`` and the plan does not
    already set ``tokenizer.ggml.model``. ``pure``: no llama.cpp-style output-tensor upgrade.
    ``dry_run``: plan everything and report it, write nothing. ``vocab_only``: the metadata and
    tokenizer without any tensor (as llama.cpp's ``--vocab-only``). ``split_max_size`` (bytes of
    tensor data) and ``split_max_tensors``: write shards ``OUT-00001-of-0000N.gguf`` that llama.cpp
    loads (see the module's docstring); ``out`` names them and is not itself written.
    """
    t0 = time.perf_counter()
    rss0 = _maxrss()
    model_dir = Path(model_dir)
    key = outtype.lower().strip()
    if key not in OUTTYPES:
        raise PorterError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    default_type, file_type = OUTTYPES[key]
    options = WriteOptions(force, progress, tokenizer, pure, dry_run, vocab_only, model_id, out_dir,
                           split_max_size, split_max_tensors)
    if split_max_size < 0 or split_max_tensors < 0:
        raise PorterError("the split limits must be positive (0: no limit)")
    if options.split and vocab_only:
        raise PorterError("--split-max-size/--split-max-tensors split tensors, and --vocab-only writes none: "
                          "drop one of them")
    if out is not None and options.split:
        if Path(out).is_dir():
            raise PorterError(f"{out} is a directory; give a file name for the GGUF (the shards are named after it)")
    elif out is not None:
        _check_target(Path(out), force)

    names = plan.tensor_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PorterError(f"the conversion plan writes these tensors more than once: {dupes}")

    ckpt = Checkpoint(model_dir)
    try:
        return _write(ckpt, model_dir, plan, None if out is None else Path(out), key, default_type, file_type,
                      options, t0, rss0)
    finally:
        ckpt.close()


def _check_target(out: Path, force: bool) -> None:
    """Refuse an output that exists (without ``force``) or is not a regular file; remove the
    temporary files of killed conversions to it."""
    if out.is_dir():
        raise PorterError(f"{out} is a directory; give a file name for the GGUF")
    if out.exists() and not force:
        raise PorterError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not (out.is_file() and not out.is_symlink()):
        raise PorterError(f"{out} is not a regular file (a device, pipe or link); porter never replaces one, "
                          "even with --force: give another output path")
    _remove_stale_temp_files(out)


def _check_not_an_input(out: Path, ckpt: Checkpoint, model_dir: Path) -> None:
    inputs = [*(e.file for e in ckpt.entries.values()), *model_dir.glob("*.json"), *model_dir.glob("*.jinja")]
    if out.exists() and any(f.exists() and out.samefile(f) for f in inputs):
        raise PorterError(f"{out} is an input of this conversion (part of the checkpoint in {model_dir}); "
                          "porter never overwrites its input, even with --force: write the GGUF elsewhere")


def _write(
    ckpt: Checkpoint, model_dir: Path, plan: ConversionPlan, out: Path | None, outtype: str, default_type: QT,
    file_type: LlamaFileType, options: WriteOptions, t0: float, rss0: int,
) -> WriteReport:
    from porter.convert import naming

    force, progress, tokenizer, pure = options.force, options.progress, options.tokenizer, options.pure
    missing = sorted({s for t in plan.tensors for s in t.sources if s not in ckpt})
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ModelError(
            f"the checkpoint in {model_dir} lacks {len(missing)} tensor(s) the conversion plan needs: "
            f"{shown}"
        )
    not_float = sorted(s for s in plan.source_names() if ckpt.entries[s].dtype not in ("F32", "F16", "BF16", "F64"))
    if not_float:
        raise ModelError(f"the checkpoint in {model_dir} stores weight(s) as integers: "
                         + ", ".join(f"{n} ({ckpt.entries[n].dtype})" for n in not_float[:8])
                         + "; a weight must be F32, F16, BF16 or F64 (the header's dtype disagrees with the data?)")
    report = WriteReport(out, outtype, int(file_type), len(plan.tensors), 0, 0.0, 0, 0,
                         dry_run=options.dry_run, vocab_only=options.vocab_only)
    used = plan.source_names()
    report.unused_tensors = sorted(n for n in ckpt.names() if n not in used and not _is_ignorable(n)
                                   and not any(fragment in n for fragment in plan.ignored))

    # Shapes and types of everything, before reading any weight.
    names = set(plan.tensor_names())
    output_name = "output.weight" if "output.weight" in names else "token_embd.weight"
    items: list[_Item] = []
    for t in plan.tensors:
        shape, rename = _probe(t, ckpt)
        if not shape or any(d <= 0 for d in shape):
            raise PorterError(f"tensor {t.gguf_name!r} would have the empty shape {shape}")
        qtype, mixed, fallback = choose_type(
            t.gguf_name, shape, t.keep_f32, default_type, is_output=t.gguf_name == output_name, pure=pure
        )
        if mixed:
            report.mixed.append(mixed)
        if fallback:
            report.fallbacks.append(fallback)
        items.append(_Item(t, shape, qtype, nbytes_of(shape, qtype), rename))
        report.tensor_types[t.gguf_name] = qtype.name
        report.tensor_shapes[t.gguf_name] = shape
        report.tensor_bytes[t.gguf_name] = items[-1].nbytes
    _check_against_spec(plan, {i.plan.gguf_name: i for i in items}, model_dir)

    writer = GGUFWriter(path=None, arch=plan.gguf_arch, split_max_size=options.split_max_size,
                        split_max_tensors=options.split_max_tensors)
    for item in items:
        writer.add_tensor_info(
            item.plan.gguf_name, item.shape, np.dtype(np.float32), item.nbytes, raw_dtype=item.qtype
        )
    metadata = naming.describe(model_dir, writer.get_total_parameter_count(), model_id=options.model_id,
                               fallback_name=plan.name)
    if options.vocab_only:  # llama.cpp's vocab-only files: the metadata and the tokenizer, no tensors
        writer.tensors = [{}]
        items = []
        report.n_tensors = 0
    if out is None:
        out = Path(options.out_dir or Path.cwd()) / naming.default_file_name(metadata, outtype,
                                                                             vocab_only=options.vocab_only)
        if not options.split:
            _check_target(out, force)
    paths = shard_paths(writer, out)
    report.shards = [Shard(path, len(tensors), sum(ti.nbytes for ti in tensors.values()))
                     for path, tensors in zip(paths, writer.tensors)]
    if options.split:
        if len(paths) == 1:
            report.warnings.append(f"everything fits in one shard: wrote the single file {out.name}")
        for path in paths:
            _check_target(path, force)
        report.warnings += _other_shards(out, paths)
    report.out = paths[0]
    for path in paths:
        _check_not_an_input(path, ckpt, model_dir)

    # Metadata.
    kv: dict[str, Any] = {
        "general.type": "model",
        **naming.general_kv(metadata),
        "general.file_type": (int(file_type), VT.UINT32),
    }
    report.general = {k: v for k, v in kv.items() if k in ("general.name", "general.size_label")}
    if tokenizer or (tokenizer is None and (model_dir / "tokenizer.json").is_file()
                     and "tokenizer.ggml.model" not in plan.kv):
        from porter.convert.tokenizer import tokenizer_kv

        kv.update(tokenizer_kv(model_dir))
    kv.update(plan.kv)
    # A checkpoint without a tokenizer: llama.cpp refuses a file with no tokenizer.ggml.model,
    # and loads one whose model is "none" (what its own converter writes then).
    kv.setdefault("tokenizer.ggml.model", "none")
    if plan.spec_json and not options.vocab_only:  # a spec without weights could not run
        kv[GRAPH_SPEC_KEY] = plan.spec_json
    kv["general.quantization_version"] = (GGML_QUANT_VERSION, VT.UINT32)
    kv.pop("general.architecture", None)  # GGUFWriter writes it from plan.gguf_arch

    for k, v in kv.items():
        entry = kv_entry(k, v)
        if entry is None:
            report.warnings.append(f"metadata key {k!r} is an empty array; GGUF cannot store it, skipped")
            continue
        writer.add_key_value(k, entry[0], entry[1], sub_type=entry[2])
    if options.dry_run:
        report.bytes_written = sum(i.nbytes for i in items)
        report.seconds = time.perf_counter() - t0
        return report

    total = sum(i.nbytes for i in items)
    shard_of = {name: i for i, tensors in enumerate(writer.tensors) for name in tensors}
    with atomic_outputs(paths, force, total) as tmps:
        try:
            open_shards(writer, tmps)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.kv_data = [{}]  # the metadata is on disk: let the tokenizer's tables go
            kv.clear()
            _release_memory()
            writer.write_ti_data_to_file()
            with _progress(progress) as bar:
                task = bar.add_task(f"{out.name} ({outtype})", total=total)
                for item in items:
                    bar.update(task, description=item.plan.gguf_name)
                    _write_tensor(writer, shard_of[item.plan.gguf_name], item, _tensor_chunks(item, ckpt, report),
                                  lambda n: bar.advance(task, n))
                    _trim()
                bar.update(task, description=f"{out.name} ({outtype})")
            assert writer.fout is not None
            for f in writer.fout:
                f.flush()
                os.fsync(f.fileno())
        finally:
            writer.close()

    report.bytes_written = sum(path.stat().st_size for path in paths)
    report.seconds = time.perf_counter() - t0
    report.peak_rss = _maxrss()
    report.peak_rss_delta = max(0, report.peak_rss - rss0)
    return report


def shard_paths(writer: GGUFWriter, out: Path) -> list[Path]:
    """The files ``writer`` (tensor infos added) writes for ``out``: ``[out]``, or its shards
    ``STEM-00001-of-0000N.gguf`` beside it (gguf-py's naming, llama.cpp's llama_split_path)."""
    return writer.format_shard_names(out)


def open_shards(writer: GGUFWriter, tmps: Sequence[Path]) -> None:
    """Point ``writer`` at the temporary files ``tmps`` (one per shard, in order) instead of the
    names it would open itself."""
    if len(tmps) != len(writer.tensors):
        raise PorterError(f"internal error: {len(tmps)} files for {len(writer.tensors)} shards")
    if len(tmps) == 1:  # it fits one file: no split keys, and no "fails split requirements" warning
        writer.split_max_size = writer.split_max_tensors = 0
    writer.fout = [open(tmp, "wb") for tmp in tmps]
    writer.state = WriterState.EMPTY


def _other_shards(out: Path, paths: list[Path]) -> list[str]:
    """Shards of an earlier split of ``out`` into another count, which this one does not replace."""
    pattern = re.compile(rf"{re.escape(out.stem)}-\d{{5}}-of-\d{{5}}\.gguf")
    others = sorted(f.name for f in out.parent.glob(f"{glob_escape(out.stem)}-*-of-*.gguf")
                    if pattern.fullmatch(f.name) and f not in paths)
    if not others:
        return []
    return [f"{out.parent.resolve()} also holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} from another "
            "split of this name; they are not part of this one (remove them)"]


@contextmanager
def atomic_output(out: Path, force: bool, nbytes: int) -> Iterator[Path]:
    """A temporary path to write ``out`` through: renamed into place when the block ends, removed
    (with any folders made for it) when it raises or a signal stops it; ``nbytes`` (the file's
    expected size) goes into the message when the disk fills up."""
    with atomic_outputs([out], force, nbytes) as (tmp,):
        yield tmp


@contextmanager
def atomic_outputs(outs: Sequence[Path], force: bool, nbytes: int) -> Iterator[list[Path]]:
    """:func:`atomic_output` for several files (a split GGUF's shards, all in one folder): each is
    renamed into place only when the block ended without error; on failure none is left."""
    # Hidden temporary names next to the outputs (same filesystem, so the final renames are
    # atomic), created with the permissions the umask gives ordinary files.
    outs = [Path(o) for o in outs]
    parent = outs[0].parent
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmps = [o.parent / f".{o.name}.{tag}.tmp" for o in outs]
    created = [d for d in [parent, *parent.parents] if not d.exists()]  # removed again on failure
    renamed: list[Path] = []
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for tmp in tmps:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as exc:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        _remove_dirs(created)
        raise PorterError(f"cannot write in {parent}: {exc}") from exc
    restore = _signals_raise()
    try:
        yield tmps
        appeared = [o for o in outs if o.exists()]
        if appeared and not force:
            raise PorterError(f"{appeared[0]} appeared while writing it; pass --force to overwrite it")
        for tmp, out in zip(tmps, outs):
            os.replace(tmp, out)
            renamed.append(out)
    except BaseException as exc:
        for path in [*tmps, *renamed]:  # a shard set is complete or not there at all
            path.unlink(missing_ok=True)
        _remove_dirs(created)
        out = outs[0] if len(outs) == 1 else f"{outs[0]} ({len(outs)} shards)"
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise PorterError(f"writing {out} failed: no space left on device (the GGUF needs about "
                              f"{nbytes / 2**20:.0f} MiB); free some space or write it elsewhere") from None
        if isinstance(exc, OSError):
            raise PorterError(f"writing {out} failed: {exc}") from exc
        raise
    finally:
        restore()


def _remove_dirs(created: list[Path]) -> None:
    """Remove the directories made for an output that was not written (innermost first)."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break


class Signalled(BaseException):
    """SIGTERM or SIGHUP arrived while a GGUF was being written (the temporary file is removed)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _signals_raise() -> Callable[[], None]:
    """Make SIGTERM and SIGHUP raise :class:`Signalled` (as SIGINT raises KeyboardInterrupt), so
    the writer's cleanup runs; returns what restores the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, _frame):
        raise Signalled(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    return lambda: [signal.signal(s, h) for s, h in old.items()] and None


def _remove_stale_temp_files(out: Path) -> None:
    """Temporary files of an earlier conversion to ``out`` whose process is gone (killed with
    SIGKILL or a power cut): ``.NAME.PID.HEX.tmp`` beside the target."""
    for f in out.parent.glob(f".{glob_escape(out.name)}.*.tmp"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp", f.name)
        if not m or not f.is_file():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that conversion is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        f.unlink(missing_ok=True)


def _malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0) and None


_trim = _malloc_trim()


def _release_memory() -> None:
    """Hand freed heap back to the system, so it does not add to the peak of what follows.

    (glibc keeps freed medium-sized blocks, such as numpy's temporaries while quantizing, in the
    process; after a few tensors that is tens of MiB of resident memory nothing uses.)
    """
    gc.collect()
    _trim()


def _tensor_chunks(item: _Item, ckpt: Checkpoint, report: WriteReport) -> Iterator[np.ndarray]:
    """The tensor's stored bytes, as arrays to write one after the other, a block of rows at a time.

    ggml's types all quantize row by row, so blocks of whole rows quantize independently. A plain
    rename is also read a block at a time; a transform needs its whole sources.
    """
    t = item.plan
    n = item.shape[-1]
    n_rows = math.prod(item.shape[:-1])
    step = max(1, CHUNK_ELEMENTS // n)
    clamped: list[float] = []
    if item.rename:
        source = t.sources[0]
        blocks = (
            (ckpt.read_rows_f32(source, r, min(r + step, n_rows)), f"checkpoint tensor {source!r} (for {t.gguf_name})")
            for r in range(0, n_rows, step)
        )
    else:
        arrays = []
        for s in t.sources:
            a = ckpt.read_f32(s)
            _check_finite(a, f"checkpoint tensor {s!r} (for {t.gguf_name})")
            arrays.append(a)
            del a
        try:
            whole = t.transform(arrays)  # type: ignore[misc]
        except Exception as exc:
            raise PorterError(f"the transform for tensor {t.gguf_name!r} failed: {exc!r}") from exc
        del arrays
        whole = np.ascontiguousarray(whole, dtype=np.float32)
        if whole.shape != item.shape:
            raise PorterError(
                f"the transform for tensor {t.gguf_name!r} returned shape {whole.shape} on real data "
                f"but {item.shape} on stand-ins of the same shapes; transforms must not depend on values"
            )
        rows = whole.reshape(n_rows, n)
        what = f"tensor {t.gguf_name!r} after its transform"
        blocks = ((rows[r : r + step], what) for r in range(0, n_rows, step))
    for block, what in blocks:
        _check_finite(block, what)
        limit = _SCALE_LIMITS.get(item.qtype)
        if limit is not None:
            big = float(np.max(np.abs(block)))
            if big > limit:
                raise ModelError(f"{what} has a value of magnitude {big:g}: {item.qtype.name} stores each block's "
                                 f"scale as float16, which overflows above {limit:g}; convert with --outtype "
                                 "f32 or bf16")
        if item.qtype == QT.F16:
            lo, hi = float(block.min()), float(block.max())
            if lo < -F16_MAX or hi > F16_MAX:
                clamped += [lo, hi]
                block = np.clip(block, -F16_MAX, F16_MAX)
        yield _quantize(block, item.qtype)
        del block
    if clamped:
        report.warnings.append(
            f"{t.gguf_name}: values in [{min(clamped):g}, {max(clamped):g}] exceed F16's range and "
            f"were clamped to ±{F16_MAX:g}"
        )


def _write_tensor(writer: GGUFWriter, shard: int, item: _Item, chunks: Iterable[np.ndarray],
                  advance: Callable[[int], None]) -> None:
    """GGUFWriter.write_tensor_data, for a tensor that arrives in pieces (into shard ``shard``)."""
    assert writer.fout is not None
    fout = writer.fout[shard]
    name = next(iter(writer.tensors[shard]))
    if name != item.plan.gguf_name:
        raise PorterError(f"internal error: writing {item.plan.gguf_name} where {name} is due")
    info = writer.tensors[shard].pop(name)
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        chunk.tofile(fout)
        written += chunk.nbytes
        advance(chunk.nbytes)
    if written != info.nbytes:
        raise PorterError(f"internal error: {name} as {item.qtype.name} is {written} bytes, expected {info.nbytes}")
    writer.write_padding(fout, written)
    writer.state = WriterState.WEIGHTS


def split_size(text: str) -> int:
    """Bytes for a ``--split-max-size`` as llama.cpp's tools take it: a number, optionally followed
    by K, M or G (powers of 1000, as convert_hf_to_gguf.py and gguf-split count)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise PorterError(f"--split-max-size {text!r}: give a positive size in bytes, optionally followed by "
                          "K, M or G (powers of 1000, as llama.cpp), e.g. 500M or 2G")
    return int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]


__all__ = ["OUTTYPES", "Shard", "TypeChange", "WriteReport", "atomic_output", "atomic_outputs", "choose_type",
           "kv_entry", "open_shards", "shard_paths", "split_size", "write_gguf"]
