"""`porter quantize`: requantize a porter GGUF from f32/f16/bf16 weights, as llama-quantize does.

The output is the input with its matrices stored in another type: every metadata key (porter's
graph spec, the tokenizer, the chat template) is kept, ``general.file_type`` says the new type.
A tensor is requantized when the graph spec uses it only as a matrix (``mul_mat``,
``mul_mat_id``) or an embedding table (``get_rows``) and it is not one the converter keeps in
F32 (norms, the MoE router, learned position and token-type tables); in an f16/bf16 file the F32
tensors are the converter's own choice and stay F32. Everything else is copied byte for byte.

File types follow ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the
tensors porter's files have (``use_more_bits(i, n)``: the first and last eighth of the layers and
every third one between):

- every quantized type except Q8_0: the output projection (``output.weight``, or
  ``token_embd.weight`` without one) Q6_K, or Q8_0 when its rows do not fit Q6_K;
- Q4_K_S: Q4_K, ``attn_v`` of the first 4 layers and ``ffn_down`` of the first eighth Q5_K;
- Q4_K_M: Q4_K, ``attn_v`` and ``ffn_down`` of the use_more_bits layers Q6_K, ``attn_qkv`` Q5_K;
- Q5_K_S: Q5_K; Q5_K_M: Q5_K, ``attn_v``/``ffn_down`` of the use_more_bits layers and
  ``attn_qkv`` Q6_K; Q6_K: Q6_K.

Not followed: llama.cpp's rules for 8-expert models (attn_v/attn_k Q8_0, attn_output Q5_K) and
for 70B models, and importance matrices. The roles are read from llama.cpp's tensor names, so a
traced-path GGUF (checkpoint names) gets the base type everywhere. A row that does not fit a
type's block falls back as llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else
F16). ``pure``: the base type everywhere (llama-quantize's ``--pure``).

Split files: the input may be the first shard of a split GGUF (the others are read beside it), and
the output can be split (``split_max_size``, ``split_max_tensors``: as ``porter convert``, see
``porter/convert/writer.py``); the input's own ``split.*`` keys are never copied.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType as VT, GGUFWriter, Keys, LlamaFileType
from gguf import GGMLQuantizationType as QT

from porter.convert.plan import GRAPH_SPEC_KEY
from porter.convert.writer import (
    OUTTYPES,
    _ROW_FALLBACK,
    _SCALE_LIMITS,
    CHUNK_ELEMENTS,
    _check_finite,
    _quantize,
    _remove_stale_temp_files,
    atomic_outputs,
    nbytes_of,
    open_shards,
    shard_paths,
)
from porter.errors import ModelError, PorterError

# file type -> (base storage type, llama.cpp file type): convert's uniform types (its q4_k is
# Q4_K_S below), then the K mixes only quantize applies
FILE_TYPES: dict[str, tuple[QT, LlamaFileType]] = {
    **{name.upper(): types for name, types in OUTTYPES.items() if name not in ("q4_k", "q6_k")},
    "Q4_K_S": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (QT.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_S": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "Q5_K_M": (QT.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": OUTTYPES["q6_k"],
}
ALIASES = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}
_FLOAT = {QT.F32, QT.F16, QT.BF16}
_SPLIT_KEYS = {Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}
_KEEP_F32 = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight|^position_embd\.weight|^token_types\.weight)$")


@dataclass
class Step:
    name: str
    shape: tuple[int, ...]  # numpy order
    src: QT
    dst: QT
    why: str = ""  # a mix's upgrade or a row fallback

    @property
    def src_bytes(self) -> int:
        return nbytes_of(self.shape, self.src)

    @property
    def dst_bytes(self) -> int:
        return nbytes_of(self.shape, self.dst)


def file_type(name: str) -> str:
    key = name.upper().strip()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise PorterError(f"unknown type {name!r}; choose one of {', '.join(FILE_TYPES)} (q4_k = Q4_K_S)")
    return key


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed_type(ftype: str, name: str, i: int, n: int) -> QT | None:
    """The type llama_tensor_get_type gives role ``name`` in layer ``i`` of ``n`` (None: the base)."""
    if "attn_v.weight" in name:
        if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return QT.Q6_K
        if ftype == "Q4_K_S" and i < 4:
            return QT.Q5_K
    elif "ffn_down" in name:
        if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            return QT.Q6_K
        if ftype == "Q4_K_S" and i < n // 8:
            return QT.Q5_K
    elif "attn_qkv.weight" in name:
        return {"Q4_K_M": QT.Q5_K, "Q5_K_M": QT.Q6_K}.get(ftype)
    return None


def _fit(qtype: QT, n: int) -> QT:
    if n % GGML_QUANT_SIZES[qtype][0]:
        qtype = _ROW_FALLBACK.get(qtype, QT.F16)
        if n % GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
    return qtype


class Source:
    """The GGUF to quantize, one file or every shard of a split one: ``fields`` (the metadata, in
    the first shard), ``tensors`` (all shards', in order) and :meth:`data`, as ``GGUFReader`` has."""

    def __init__(self, readers: list[GGUFReader], paths: list[Path]):
        self.readers, self.paths = readers, paths
        self.fields = readers[0].fields
        self.tensors = [t for r in readers for t in r.tensors]
        self._reader_of = {t.name: r for r in readers for t in r.tensors}

    def data(self, t) -> np.ndarray:
        return self._reader_of[t.name].data[t.data_offset:t.data_offset + t.n_bytes]


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _read(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct errors or IndexError on damaged files
        raise ModelError(f"{path} is not a readable GGUF file ({exc}); give a GGUF written by porter") from None


def open_gguf(path: Path) -> Source:
    """The GGUF at ``path`` through gguf-py's reader, every shard of it if it is split."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file; give a GGUF written by porter")
    first = _read(path)
    count = _field(first, Keys.Split.LLM_KV_SPLIT_COUNT)
    if not (isinstance(count, int) and count > 1):
        return Source([first], [path])
    from porter.runtime.gguf_file import GGUFFile

    with GGUFFile(path) as f:  # finds and checks the other shards
        paths = [shard.path for shard in f.shards]
    return Source([first, *(_read(p) for p in paths[1:])], paths)


def plan(reader: Source, path: Path, ftype: str, pure: bool = False) -> list[Step]:
    """What :func:`quantize` does to each tensor of ``reader`` (the GGUF at ``path``)."""
    from porter.errors import SpecError
    from porter.runtime.repack import weights_used_only_as
    from porter.spec import loads

    text = _field(reader, GRAPH_SPEC_KEY)
    if not isinstance(text, str):
        raise ModelError(f"{path} carries no porter graph spec ({GRAPH_SPEC_KEY}); quantize a GGUF written by "
                         "`porter convert` or `porter port`")
    try:
        spec = loads(text)
    except SpecError as exc:
        raise ModelError(f"{path}: its graph spec is invalid ({exc}); convert the model again") from None
    quantized = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if QT(t.tensor_type) not in _FLOAT]
    if quantized:
        raise ModelError(f"{path} already holds quantized tensors ({', '.join(quantized[:4])}"
                         f"{' ...' if len(quantized) > 4 else ''}); requantizing rounded weights adds their errors: "
                         "quantize from an f32, f16 or bf16 GGUF (porter convert -t f32)")
    patterns = weights_used_only_as(spec, {("mul_mat", 0), ("mul_mat_id", 0), ("get_rows", 0)})
    n_layer = int(spec.hparams.get("n_layer", 0) or 0)
    matrices = set()
    for w in spec.weights:
        if w.name in patterns:
            layers = (w.layers if w.layers is not None else range(n_layer)) if w.layered else [None]
            matrices |= {w.name.format(L=i) if w.layered else w.name for i in layers}
    all_f32 = all(QT(t.tensor_type) == QT.F32 for t in reader.tensors)
    base, _ = FILE_TYPES[ftype]
    names = {t.name for t in reader.tensors}
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    counters: dict[str, int] = {}
    totals: dict[str, int] = {}
    for t in reader.tensors:
        role = re.sub(r"^blk\.\d+\.", "", t.name)
        totals[role] = totals.get(role, 0) + 1
    steps = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        src = QT(t.tensor_type)
        role = re.sub(r"^blk\.\d+\.", "", t.name)
        i = counters.get(role, 0)
        counters[role] = i + 1
        candidate = (t.name in matrices and len(shape) >= 2 and not _KEEP_F32.search(t.name)
                     and (src != QT.F32 or all_f32))
        if not candidate:
            steps.append(Step(t.name, shape, src, src))
            continue
        want, why = base, ""
        if not pure and base not in _FLOAT:
            if t.name == output and base != QT.Q8_0:
                want, why = (QT.Q6_K if shape[-1] % 256 == 0 else QT.Q8_0), "output projection"
            else:
                m = re.match(r"blk\.(\d+)\.", t.name)
                layer, n = (int(m.group(1)), n_layer) if m and n_layer else (i, totals[role])
                mixed = _mixed_type(ftype, t.name, layer, n)
                if mixed is not None:
                    want, why = mixed, f"{ftype} mix: layer {layer} of {n}"
        used = _fit(want, shape[-1])
        if used != want:
            why = (why + "; " if why else "") + (f"row of {shape[-1]} does not fit {want.name}'s blocks of "
                                                 f"{GGML_QUANT_SIZES[want][0]}")
        steps.append(Step(t.name, shape, src, used, why))
    return steps


def describe(steps: list[Step]) -> str:
    """The plan as a table (tensor, shape, from, to, size) and its total."""
    w = max(len(s.name) for s in steps)
    lines = [f"{'tensor':<{w}}  {'shape':<16} {'from':<5} {'to':<5} {'size':>22}  note"]
    for s in steps:
        size = f"{s.src_bytes / 2**20:.2f} -> {s.dst_bytes / 2**20:.2f} MiB"
        lines.append(f"{s.name:<{w}}  {'x'.join(map(str, s.shape)):<16} {s.src.name:<5} {s.dst.name:<5} {size:>22}  {s.why}")
    src, dst = sum(s.src_bytes for s in steps), sum(s.dst_bytes for s in steps)
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.dst.name] = counts.get(s.dst.name, 0) + 1
    lines.append(f"total: {len(steps)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}), "
                 f"{src / 2**20:.2f} MiB -> {dst / 2**20:.2f} MiB ({dst / src:.1%})")
    return "\n".join(lines)


def _copy_kv(reader: Source, writer: GGUFWriter, file_type_id: int) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in _SPLIT_KEYS:
            continue  # the header's own counts; the writer writes the architecture and its own split
        if key == "general.file_type":
            writer.add_key_value(key, file_type_id, VT.UINT32)
            continue
        main = VT(f.types[0])
        if main == VT.ARRAY:
            sub = VT(f.types[-1]) if len(f.types) > 1 else VT.UINT8
            writer.add_key_value(key, f.contents(), VT.ARRAY, sub_type=sub)
        else:
            writer.add_key_value(key, f.contents(), main)
    if "general.file_type" not in reader.fields:
        writer.add_key_value("general.file_type", file_type_id, VT.UINT32)


def _chunks(reader: Source, t, step: Step):
    """The tensor's new bytes, a block of rows at a time."""
    from porter.runtime.quant import dequantize
    from porter.runtime.types import GGMLType

    raw = reader.data(t)
    if step.dst == step.src:
        yield np.asarray(raw)
        return
    n = step.shape[-1]
    rows = math.prod(step.shape[:-1])
    row_bytes = step.src_bytes // rows
    per = max(1, CHUNK_ELEMENTS // n)
    for r in range(0, rows, per):
        r1 = min(rows, r + per)
        block = dequantize(raw[r * row_bytes:r1 * row_bytes], GGMLType(int(step.src)), (r1 - r, n))
        _check_finite(block, f"tensor {step.name!r}")
        limit = _SCALE_LIMITS.get(step.dst, 65504.0 if step.dst == QT.F16 else None)
        if limit is not None and float(np.max(np.abs(block))) > limit:
            raise ModelError(f"tensor {step.name!r} has values of magnitude {float(np.max(np.abs(block))):g}, beyond "
                             f"what {step.dst.name} holds ({limit:g}); choose another type (bf16, or a K-quant)")
        yield np.ascontiguousarray(_quantize(block, step.dst)).view(np.uint8).reshape(-1)


def quantize(src: Path, out: Path, ftype: str, *, force: bool = False, pure: bool = False,
             split_max_size: int = 0, split_max_tensors: int = 0) -> list[Step]:
    """Write ``out``: ``src`` (an f32/f16/bf16 porter GGUF) with its matrices in ``ftype``;
    ``split_max_size``/``split_max_tensors``: as shards named after ``out`` (see the module's docstring)."""
    src, out = Path(src), Path(out)
    ftype = file_type(ftype)
    split = bool(split_max_size or split_max_tensors)
    if out.is_dir():
        raise PorterError(f"{out} is a directory; give a file name for the GGUF")
    if not split:
        _check_output(out, src, force)
    reader = open_gguf(src)
    steps = plan(reader, src, ftype, pure)
    arch = _field(reader, "general.architecture")
    alignment = _field(reader, "general.alignment")
    writer = GGUFWriter(path=None, arch=str(arch), split_max_size=split_max_size, split_max_tensors=split_max_tensors)
    if isinstance(alignment, int):
        writer.data_alignment = alignment
    _copy_kv(reader, writer, int(FILE_TYPES[ftype][1]))
    for s in steps:
        writer.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.dst_bytes, raw_dtype=s.dst)
    paths = shard_paths(writer, out)
    for path in paths:
        for input_path in reader.paths:
            _check_output(path, input_path, force)
        _remove_stale_temp_files(path)
    shard_of = {name: i for i, tensors in enumerate(writer.tensors) for name in tensors}
    total = sum(s.dst_bytes for s in steps)
    with atomic_outputs(paths, force, total) as tmps:
        try:
            open_shards(writer, tmps)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t, s in zip(reader.tensors, steps):
                fout = writer.fout[shard_of[s.name]]
                writer.write_padding(fout, fout.tell())
                written = 0
                for chunk in _chunks(reader, t, s):
                    chunk.tofile(fout)
                    written += chunk.nbytes
                if written != s.dst_bytes:  # pragma: no cover - a size computation gone wrong
                    raise PorterError(f"internal error: {s.name} as {s.dst.name} is {written} bytes, "
                                      f"expected {s.dst_bytes}")
                writer.write_padding(fout, written)
            for fout in writer.fout:
                fout.flush()
                os.fsync(fout.fileno())
        finally:
            writer.close()
    return steps


def output_paths(out: Path, steps: list[Step], *, split_max_size: int = 0, split_max_tensors: int = 0) -> list[Path]:
    """The files :func:`quantize` writes for ``steps``: ``[out]`` or its shards."""
    writer = GGUFWriter(path=None, arch="", split_max_size=split_max_size, split_max_tensors=split_max_tensors)
    for s in steps:
        writer.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.dst_bytes, raw_dtype=s.dst)
    return shard_paths(writer, Path(out))


def _check_output(out: Path, src: Path, force: bool) -> None:
    if out.exists() and (out.resolve() == src.resolve() or (src.exists() and os.path.samefile(src, out))):
        raise PorterError(f"{out} is the input; porter never overwrites its input, even with --force: "
                          "write the quantized GGUF elsewhere")
    if out.exists() and not force:
        raise PorterError(f"{out} already exists; pass --force to overwrite it")
    if out.exists() and not (out.is_file() and not out.is_symlink()):
        raise PorterError(f"{out} is not a regular file (a device, pipe or link); give another output path")


__all__ = ["ALIASES", "FILE_TYPES", "Source", "Step", "describe", "file_type", "open_gguf", "output_paths", "plan",
           "quantize"]
