"""Copies of a GGUF with metadata keys removed (a porter file made to look like a stock one)."""

from __future__ import annotations

import struct
from pathlib import Path


def strip_keys(src: str | Path, dst: str | Path, keys) -> list[str]:
    """Write ``src`` to ``dst`` without the metadata ``keys`` (those present); tensors and every
    other key are copied byte for byte, the data section realigned. Returns the keys removed."""
    from gguf import GGUFReader

    reader = GGUFReader(src)
    raw = Path(src).read_bytes()
    drop = [f for name, f in reader.fields.items() if name in set(keys)]
    spans = sorted((f.offset, f.offset + sum(int(p.nbytes) for p in f.parts)) for f in drop)
    align = int(reader.alignment)
    header_end = max(int(t.field.offset) + sum(int(p.nbytes) for p in t.field.parts) for t in reader.tensors) \
        if reader.tensors else max(f.offset + sum(int(p.nbytes) for p in f.parts) for f in reader.fields.values())
    data_start = int(reader.data_offset)
    out, pos = bytearray(), 0
    for start, end in spans:
        out += raw[pos:start]
        pos = end
    out += raw[pos:header_end]
    n_kv = struct.unpack_from("<Q", out, 16)[0]
    struct.pack_into("<Q", out, 16, n_kv - len(drop))
    out += b"\0" * (-len(out) % align)
    out += raw[data_start:]
    Path(dst).write_bytes(bytes(out))
    return [f.name for f in drop]


_LOAD_CHILD = """
import json, sys
import numpy as np
import porter
with porter.load(sys.argv[1], n_ctx=64) as m:
    logits = m.logits([1, 2, 3, 4, 5])
    ids = m.encode("The class statement") if m.metadata.get("tokenizer_json") else None
print(json.dumps({"transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules, "ids": ids,
                  "source": m.metadata["spec_source"], "logits": logits.tolist()}))
"""


def load_in_child(path, cache, **env) -> dict:
    """Load ``path`` in a fresh Python with the spec cache in ``cache``: which heavy modules it
    imported, where its spec came from, logits of five tokens and (with a vocabulary) some ids."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PORTER_CACHE_DIR": str(cache), **env})
    if done.returncode != 0:
        raise AssertionError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


__all__ = ["load_in_child", "strip_keys"]
