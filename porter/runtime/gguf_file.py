"""A GGUF file read through a memory map: metadata in milliseconds, tensor bytes without copies.

``gguf.GGUFReader`` builds numpy views for every field and every element of every array (the
tokenizer's ~50k tokens and merges alone), which took 2.5 s for SmolLM2's 141 MiB file. Here
the header is walked once with ``struct`` over the map, values are decoded only when asked for
(arrays of strings are skipped by their lengths until then), and a tensor's data is a
``memoryview`` into the map, which the loader hands to ggml directly.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, key-value
count u64; each key a string (u64 length + UTF-8), a value type u32 and the value; then per
tensor its name, dimension count u32, dimensions u64 (innermost first, ggml's ``ne``), ggml
type u32 and data offset u64; the data section starts at the next multiple of
``general.alignment`` (default 32).

Split files (llama.cpp's ``gguf-split`` and ``convert_hf_to_gguf.py --split-max-size``):
``NAME-00001-of-00003.gguf`` holds the metadata and the first tensors, the other shards beside it
only their tensors; every shard has ``split.no`` (u16, from 0), ``split.count`` (u16) and
``split.tensors.count`` (i32, over all shards). Opening the first shard opens the others
(``shards``): ``tensors`` and ``data`` cover all of them, ``get`` reads the first one's metadata.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from porter.errors import ModelError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SIZES = {k: struct.calcsize(v) for k, v in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_FIXED = 24  # magic, version, tensor count, key-value count
_AGAIN = "convert the model again"
# llama.cpp's LLM_KV_SPLIT_* keys and llama_split_path's "%s-%05d-of-%05d.gguf" (gguf-py's
# Keys.Split and SHARD_NAME_FORMAT; the runtime does not import the gguf package)
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
SHARD_NAME_FORMAT = "{:s}-{:05d}-of-{:05d}.gguf"


class _PastEnd(Exception):
    """The header runs past the end of the file (struct.error says the same for fixed fields)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order, innermost first
    type: int  # ggml type id
    offset: int  # absolute offset of the data in its file
    nbytes: int
    shard: int = 0  # the file that holds it: GGUFFile.shards[shard]


class GGUFFile:
    """Open with ``GGUFFile(path)`` (or as a context manager); ``get(key)`` decodes one value."""

    def __init__(self, path: str | Path, *, follow_splits: bool = True):
        self.path = Path(path)
        self.shards: list[GGUFFile] = [self]
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise ModelError(f"{self.path}: cannot open ({exc.strerror})") from None
        if os.fstat(self._file.fileno()).st_size == 0:  # mmap refuses empty files
            self._file.close()
            raise ModelError(f"{self.path}: the file is empty (truncated: a copy or download cut short?); {_AGAIN}")
        try:
            # private copy-on-write pages: ggml can never write into the file
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except (ValueError, OSError) as exc:
            self._file.close()
            raise ModelError(f"{self.path}: cannot map the file into memory ({exc})") from None
        self._where = f"the first {_FIXED} bytes (magic, version and counts)"  # what _parse is reading
        try:
            self._parse()
        except (struct.error, _PastEnd, UnicodeDecodeError, IndexError, ValueError) as exc:
            error = self._header_error(exc)
            self.close()
            raise error from None
        except ModelError:
            self.close()
            raise
        if follow_splits:
            try:
                self._open_shards()
            except BaseException:
                self.close()
                raise

    def _header_error(self, exc: Exception) -> ModelError:
        if isinstance(exc, UnicodeDecodeError):
            return ModelError(f"{self.path}: {self._where} is not UTF-8 text; the file is damaged: {_AGAIN}")
        if isinstance(exc, (struct.error, _PastEnd)):
            size = len(self._map)
            damaged = ", or a length there is damaged" if size >= _FIXED else ""
            return ModelError(f"{self.path}: truncated: the file ends (at {size} bytes) inside {self._where}{damaged}; "
                              f"{_AGAIN}")
        return ModelError(f"{self.path}: the header is corrupt in {self._where} ({exc}); the file is damaged: {_AGAIN}")

    # -- header ----------------------------------------------------------------------------------
    def _parse(self) -> None:
        m = self._map
        if m[:4] != b"GGUF"[:len(m)]:
            raise ModelError(f"{self.path}: not a GGUF file (no GGUF magic); {_AGAIN}")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if self.version not in (2, 3):
            raise ModelError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        pos = _FIXED
        self._fields: dict[str, tuple[int, int]] = {}  # key -> (value type, offset of the value)
        key = None
        for i in range(n_kv):
            self._where = f"metadata key {i + 1} of {n_kv}" + (f" (after {key})" if key else "")
            key, pos = self._string(pos)
            self._where = f"the value of {key}"
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos += 4
            self._fields[key] = (vtype, pos)
            pos = self._skip(vtype, pos)
            if pos > len(m):
                raise _PastEnd
        infos = []
        name = None
        for i in range(n_tensors):
            self._where = f"the name of tensor {i + 1} of {n_tensors}" + (f" (after {name})" if name else "")
            name, pos = self._string(pos)
            self._where = f"the shape and type of tensor {name}"
            (n_dims,) = struct.unpack_from("<I", m, pos)
            if n_dims > 4:
                raise ValueError(f"{n_dims} dimensions; ggml has at most 4")
            ne = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
            gtype, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, ne, gtype, offset))
        align = self.get("general.alignment") or 32
        self.data_offset = -(-pos // int(align)) * int(align)
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, gtype, offset in infos:
            nbytes = _nbytes(gtype, ne)
            start = self.data_offset + offset
            if nbytes is not None and start + nbytes > len(m):
                raise ModelError(f"{self.path}: truncated: tensor {name} runs past the end of the file (its data "
                                 f"ends at byte {start + nbytes}, the file has {len(m)}); {_AGAIN}")
            self.tensors[name] = TensorInfo(name, tuple(int(x) for x in ne), int(gtype), start,
                                            -1 if nbytes is None else nbytes)

    # -- split files ---------------------------------------------------------------------------
    def _split_key(self, key: str) -> int | None:
        value = self.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ModelError(f"{self.path}: {key} = {value!r} is not a count; the file is damaged: {_AGAIN}")
        return value

    def _open_shards(self) -> None:
        """Open the other shards of a split file (this one must be the first) and merge their tensors."""
        count = self._split_key(SPLIT_COUNT)
        if count is None or count <= 1:
            return
        no = self._split_key(SPLIT_NO) or 0
        suffix = SHARD_NAME_FORMAT.format("", no + 1, count)
        name = self.path.name
        prefix = name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None
        if no != 0:
            first = f"; give the first one, {self.path.with_name(prefix + SHARD_NAME_FORMAT.format('', 1, count))}" \
                if prefix else "; give the first one (split.no 0)"
            raise ModelError(f"{self.path} is shard {no + 1} of {count} of a split GGUF{first}")
        if prefix is None:
            raise ModelError(f"{self.path} is the first of {count} shards of a split GGUF, but its name does not end "
                             f"in {suffix}, so the other shards cannot be found; give the shards their names "
                             f"(NAME{suffix}, NAME{SHARD_NAME_FORMAT.format('', 2, count)}, ...)")
        for i in range(1, count):
            path = self.path.with_name(prefix + SHARD_NAME_FORMAT.format("", i + 1, count))
            if not path.is_file():
                raise ModelError(f"{path}: no such file: shard {i + 1} of the {count} of the split GGUF {self.path} "
                                 "is missing; put every shard in the same folder")
            shard = GGUFFile(path, follow_splits=False)
            self.shards.append(shard)
            shard_count, shard_no = shard._split_key(SPLIT_COUNT), shard._split_key(SPLIT_NO)
            if shard_count != count:
                raise ModelError(f"{path}: {SPLIT_COUNT} is {shard_count}, but {self.path.name} says {count}; the "
                                 "shards come from different conversions: convert the model again")
            if shard_no != i:
                raise ModelError(f"{path}: {SPLIT_NO} is {shard_no}, its name says shard {i + 1} (split.no {i}); "
                                 "the shards are misnamed or come from different conversions")
            for tname, t in shard.tensors.items():
                if tname in self.tensors:
                    raise ModelError(f"{path}: tensor {tname} is also in an earlier shard; the shards come from "
                                     "different conversions: convert the model again")
                self.tensors[tname] = TensorInfo(t.name, t.ne, t.type, t.offset, t.nbytes, i)
        expected = self._split_key(SPLIT_TENSORS_COUNT)
        if expected is not None and expected != len(self.tensors):
            raise ModelError(f"{self.path}: {SPLIT_TENSORS_COUNT} is {expected}, the {count} shards hold "
                             f"{len(self.tensors)} tensors; a shard is damaged or from another conversion")

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        end = pos + 8 + n
        if end > len(self._map):
            raise _PastEnd
        return self._map[pos + 8:end].decode("utf-8"), end

    def _skip(self, vtype: int, pos: int) -> int:
        m = self._map
        if vtype in _SIZES:
            return pos + _SIZES[vtype]
        if vtype == _STRING:
            return pos + 8 + struct.unpack_from("<Q", m, pos)[0]
        if vtype == _ARRAY:
            itype, n = struct.unpack_from("<IQ", m, pos)
            pos += 12
            if itype in _SIZES:
                return pos + n * _SIZES[itype]
            if itype == _STRING:
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(n):
                    pos += 8 + unpack(m, pos)[0]
                return pos
            for _ in range(n):
                pos = self._skip(itype, pos)
            return pos
        raise ValueError(f"unknown GGUF value type {vtype}")

    def _value(self, vtype: int, pos: int):
        m = self._map
        if vtype in _SCALARS:
            return struct.unpack_from(_SCALARS[vtype], m, pos)[0]
        if vtype == _STRING:
            return self._string(pos)[0]
        if vtype == _ARRAY:
            itype, n = struct.unpack_from("<IQ", m, pos)
            pos += 12
            if n > len(m) - pos:
                raise _PastEnd
            if itype in _NUMPY:
                import numpy as np

                return np.frombuffer(m, dtype=_NUMPY[itype], count=n, offset=pos).tolist()
            out = []
            for _ in range(n):
                out.append(self._value(itype, pos))
                pos = self._skip(itype, pos)
            return out
        raise ValueError(f"unknown GGUF value type {vtype}")

    # -- access ----------------------------------------------------------------------------------
    def keys(self):
        return self._fields.keys()

    def get(self, key: str, default=None):
        """The value of a metadata key (str, int, float, bool or list), decoded now."""
        f = self._fields.get(key)
        if f is None:
            return default
        try:
            return self._value(*f)
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: the value of {key} is not UTF-8 text; the file is damaged: {_AGAIN}") from None
        except (struct.error, _PastEnd):
            raise ModelError(f"{self.path}: truncated: the value of {key} runs past the end of the file, or a length "
                             f"in it is damaged; {_AGAIN}") from None
        except ValueError as exc:
            raise ModelError(f"{self.path}: the value of {key} is corrupt ({exc}); the file is damaged: {_AGAIN}") from None

    def data(self, name: str) -> memoryview:
        """The bytes of a tensor, a view into the map (valid until :meth:`close`)."""
        t = self.tensors[name]
        return memoryview(self.shards[t.shard]._map)[t.offset:t.offset + t.nbytes]

    def header(self) -> bytes:
        """The bytes before the tensor data, of every shard: metadata and tensor infos."""
        return b"".join(bytes(memoryview(f._map)[:f.data_offset]) for f in self.shards)

    def pointer(self):
        """A cffi ``char *`` to the start of the map, for ggml buffers that live in it (the map
        stays open while the pointer is held: release it with :meth:`close`)."""
        from porter.runtime._lib import ffi

        if getattr(self, "_ptr", None) is None:
            self._ptr = ffi.from_buffer(self._map)
        return self._ptr

    @property
    def size(self) -> int:
        """Bytes of the file, all its shards together."""
        return sum(shard.mapped_size for shard in self.shards)

    @property
    def mapped_size(self) -> int:
        """Bytes of this shard's map (what :meth:`pointer` points to)."""
        return len(self._map)

    def close(self) -> None:
        for shard in getattr(self, "shards", [])[1:]:
            shard.close()
        self.shards = [self]
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr is not None:
            from porter.runtime._lib import ffi

            ffi.release(ptr)
        m, self._map = getattr(self, "_map", None), None
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view is still held somewhere: the map goes with it
                pass
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _nbytes(gtype: int, ne) -> int | None:
    """Bytes of a tensor of ggml type ``gtype`` and shape ``ne`` (None for a type ggml lacks)."""
    from porter.runtime._lib import lib

    if gtype >= lib.GGML_TYPE_COUNT or int(lib.ggml_blck_size(gtype)) == 0:
        return None
    n_rows = 1
    for x in ne[1:]:
        n_rows *= int(x)
    ne0 = int(ne[0]) if ne else 1
    if ne0 % int(lib.ggml_blck_size(gtype)):
        return None
    return int(lib.ggml_row_size(gtype, ne0)) * n_rows
