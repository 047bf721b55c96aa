"""A disk cache of what porter derives from a stock llama.cpp GGUF's header.

Rebuilding a stock file's spec (:mod:`porter.runtime.stock`) asks transformers for the config
class's defaults, and importing transformers imports torch: seconds, where loading the weights
takes a fraction of one; rebuilding its tokenizer (:mod:`porter.runtime.ggml_vocab`) decodes
every token and merge string of the vocabulary. Both depend only on the file's header (metadata
and tensor infos, not the weights) and on porter's own code, so they are kept on disk under a
key made of both (one JSON file per kind: ``spec``, ``tokenizer``), and later loads of the same
file skip that work.

The cache lives in ``$PORTER_CACHE_DIR``, else ``$XDG_CACHE_HOME/porter``, else
``~/.cache/porter`` (``specs/<key>-<kind>.json``). It is only an accelerator: an entry that cannot be
read or parsed is ignored (and rewritten), and a cache folder that cannot be written leaves
loading as it was. ``PORTER_SPEC_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import porter

_ROOT = Path(porter.__file__).resolve().parent
# what a rebuilt spec depends on besides the file: the plugins, the templates, the spec model,
# introspection and the rebuild itself (their sizes and modification times stand for them)
_SOURCES = [_ROOT.parent / "plugins", _ROOT.parent / "templates", _ROOT / "spec", _ROOT / "introspect",
            _ROOT / "arch.py", _ROOT / "render.py", _ROOT / "runtime" / "stock.py", _ROOT / "runtime" / "ggml_vocab.py",
            _ROOT / "runtime" / "spec_cache.py"]
_FORMAT = 1


def cache_dir() -> Path:
    env = os.environ.get("PORTER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "porter"


def enabled() -> bool:
    return os.environ.get("PORTER_SPEC_CACHE", "1") != "0"


def _sources_fingerprint() -> bytes:
    h = hashlib.sha256()
    for src in _SOURCES:
        files = sorted(src.rglob("*")) if src.is_dir() else [src]
        for f in files:
            if f.suffix in (".py", ".j2", ".json") and f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(_ROOT.parent)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.digest()


def key_of(header: bytes) -> str:
    """The cache key of a file whose header (everything before the tensor data) is ``header``."""
    h = hashlib.sha256()
    h.update(f"porter {porter.__version__} spec-cache {_FORMAT};".encode())
    h.update(_sources_fingerprint())
    h.update(header)
    return h.hexdigest()


def load(key: str, kind: str, fields: dict[str, type]) -> dict | None:
    """The cached ``kind`` entry of ``key`` if it has ``fields`` of those types, else None."""
    if not enabled():
        return None
    try:
        entry = json.loads((cache_dir() / "specs" / f"{key}-{kind}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), t) for k, t in fields.items()):
        return None
    return entry


def store(key: str, kind: str, entry: dict) -> None:
    """Write an entry atomically (a reader never sees half of one); any OS error is ignored."""
    if not enabled():
        return
    folder = cache_dir() / "specs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(entry, fh)
            os.replace(tmp, folder / f"{key}-{kind}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, TypeError, ValueError):  # read-only home, full disk, a value JSON cannot hold
        pass
