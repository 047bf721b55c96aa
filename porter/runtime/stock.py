"""Graph specs for GGUFs that carry none: files written by llama.cpp's converter (or any other).

The plugin whose ``gguf_arch`` is the file's ``general.architecture`` is given back the config
it would have been written from: the llama.cpp keys read through the plugin's ``gguf_config``
table (the reverse of its ``gguf_kv``), the parameter names and shapes from its tensor table
(the reverse of its renaming), transformers' defaults for the rest. The plugin then renders its
spec as for a checkpoint. Nothing is guessed silently: the rebuilt config must write back
exactly the file's architecture keys and exactly its tensors, and a config field the plugin
names in ``gguf_unknown`` (one no llama.cpp key carries) refuses the file; ``gguf_implies`` sets
fields llama.cpp's reading of the keys implies, and a ``rope_freqs.weight`` tensor stands for Llama
3's rope, read from the file as llama.cpp reads it. Where several plugins
share a ``gguf_arch`` (llama, mistral and mixtral are all llama.cpp's ``llama``), the first that
passes these checks is used, the one whose model_type is the architecture's name first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from porter.errors import ModelError, SpecError
from porter.runtime import spec_cache
from porter.runtime.gguf_file import GGUFFile
from porter.spec import loads

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_RETRY = "convert the checkpoint with `porter convert` instead"


class _Mismatch(Exception):
    """This plugin cannot account for the file (the next candidate may)."""


@dataclass
class Rebuilt:
    spec: Any  # porter.spec.Spec
    model_type: str  # the plugin (Architecture subclass) that rendered it
    config: dict  # the config it was rendered from


def _merged(cls, attr: str) -> dict:
    out: dict = {}
    for c in reversed(cls.__mro__):
        out.update(c.__dict__.get(attr, {}))
    return out


def _arch_keys(reader: GGUFFile, arch: str) -> dict[str, Any]:
    prefix = arch + "."
    return {k[len(prefix):]: reader.get(k) for k in reader.keys() if k.startswith(prefix)}


def candidates(arch: str) -> list[type]:
    from porter.plugins import architectures

    found = [c for c in architectures().values() if c.gguf_arch == arch]
    return sorted(found, key=lambda c: c.model_type != arch)  # stable: plugin order otherwise


def _rope(kv: dict, head_dim: int, factors_tensor: bool) -> dict | None:
    """transformers' rope_parameters (with the partial rotary factor) from llama.cpp's rope keys.

    ``factors_tensor``: the file holds per-pair frequency factors (``rope_freqs.weight``, llama.cpp's
    form of Llama 3's rope) and the plugin stores llama3 factors so. The graph then reads them from
    the file: the llama3 parameters given here only make the plugin declare that input (all llama3
    settings give the same graph, attention factor 1, as llama.cpp applies them)."""
    if "rope.dimension_count" not in kv and "rope.freq_base" not in kv:
        return None
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(kv.get("rope.freq_base", 10000.0))}
    kind = kv.get("rope.scaling.type")
    if factors_tensor and kind in (None, "none"):
        rope.update(rope_type="llama3", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=int(kv.get("context_length") or 2048))
    if kind not in (None, "none"):
        if kind not in ("linear", "yarn"):
            raise _Mismatch(f"rope.scaling.type = {kind!r} is a rope scaling porter cannot rebuild from the keys")
        rope.update(rope_type=kind, factor=float(kv["rope.scaling.factor"]))
        if kind == "yarn":
            rope["original_max_position_embeddings"] = int(kv["rope.scaling.original_context_length"])
    n_dims = int(kv.get("rope.dimension_count", head_dim))
    if n_dims != head_dim:
        rope["partial_rotary_factor"] = n_dims / head_dim
    return rope


def _parameters(cls, reader: GGUFFile) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(checkpoint parameter name -> numpy-order shape, GGUF tensors the tables do not name)."""
    table = _merged(cls, "tensors")
    table.update({k: v for k, v in getattr(cls, "alternatives", {}).items() if k not in table})
    experts = _merged(cls, "experts")
    params: dict[str, tuple[int, ...]] = {}
    unnamed = []
    for name, info in reader.tensors.items():
        shape = tuple(reversed(info.ne))
        m = _LAYER.match(name)
        pattern, layer = ("blk.{L}." + m.group(2), m.group(1)) if m else (name, None)
        if pattern in table:
            params[table[pattern].format(L=layer)] = cls.checkpoint_shape(name, shape)
        elif pattern in experts and len(shape) == 3:
            for e in range(shape[0]):
                params[experts[pattern].format(L=layer, E=e)] = shape[1:]
        else:
            unnamed.append(name)
    return params, unnamed


def _config(cls, kv: dict, reader: GGUFFile) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    table = _merged(cls, "gguf_config")
    for key, field in table.items():
        if key in kv:
            fields[field] = kv[key]
    for key in ("embedding_length", "block_count", "attention.head_count"):
        if key not in kv:
            raise _Mismatch(f"the file has no {cls.gguf_arch}.{key}, which every {cls.gguf_arch} file carries")
    hidden, heads, n_layer = int(kv["embedding_length"]), int(kv["attention.head_count"]), int(kv["block_count"])
    if not 0 < n_layer <= len(reader.tensors):  # every layer has tensors of its own
        raise _Mismatch(f"{cls.gguf_arch}.block_count = {n_layer} is not a layer count a file of "
                        f"{len(reader.tensors)} tensors can hold")
    if heads <= 0 or hidden % heads and "attention.key_length" not in kv:
        raise _Mismatch(f"{cls.gguf_arch}.attention.head_count = {heads} does not divide the embedding length {hidden}")
    fields["head_dim"] = int(kv.get("attention.key_length", hidden // heads))
    fields.setdefault(table["attention.head_count_kv"], heads)  # llama.cpp's default: no grouping
    if "vocab_size" not in fields:  # older converters write none: the embedding table's rows
        embd = reader.tensors.get("token_embd.weight")
        if embd is None:
            raise _Mismatch(f"neither {cls.gguf_arch}.vocab_size nor token_embd.weight tells the vocabulary size")
        fields["vocab_size"] = int(embd.ne[1])
    if fields.get("sliding_window") == 0:
        fields["sliding_window"] = None  # llama.cpp's "no window"
    factors = "rope_freqs.weight" in reader.tensors and "llama3" in cls.ROPE_FACTORS_IN_GGUF
    fields["rope_parameters"] = _rope(kv, fields["head_dim"], factors)
    fields["tie_word_embeddings"] = "output.weight" not in reader.tensors
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = reader.get(f"tokenizer.ggml.{name}")
        if value is not None:
            fields[name.replace("padding", "pad")] = int(value)
    return fields


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, float) or isinstance(b, float):  # GGUF keeps float32: equal once rounded to it
        import numpy as np

        return bool(np.float32(a) == np.float32(b))
    return a == b


def _show(value) -> str:
    return f"{value[:8]!r}{'...' if len(value) > 8 else ''}" if isinstance(value, list) else repr(value)


def _try(cls, reader: GGUFFile, kv: dict, path: Path) -> Rebuilt:
    from transformers import AutoConfig

    from porter.introspect import ModelInfo
    from porter.introspect.hparams import hparams_from_config
    from porter.plugins import register_transformers_classes

    if cls.gguf_unknown:
        raise _Mismatch(f"its graph depends on {', '.join(cls.gguf_unknown)}, which no llama.cpp "
                        f"{cls.gguf_arch} key carries")
    params, unnamed = _parameters(cls, reader)
    if "llama3" in cls.ROPE_FACTORS_IN_GGUF:  # the rope's own input, checked with the planned tensors below
        unnamed = [n for n in unnamed if n != "rope_freqs.weight"]
    if unnamed:
        raise _Mismatch(f"it has no place for tensor(s) {', '.join(unnamed[:4])}{' ...' if len(unnamed) > 4 else ''}")
    try:
        fields = {**_config(cls, kv, reader), **_merged(cls, "gguf_implies")}
    except (TypeError, ValueError, KeyError) as exc:  # a key of the wrong type, or one that needs another
        raise _Mismatch(f"its keys do not make a config ({type(exc).__name__}: {exc})") from None
    register_transformers_classes(models=False)
    from transformers import CONFIG_MAPPING

    if isinstance(getattr(CONFIG_MAPPING[cls.model_type], "head_dim", None), property):
        fields.pop("head_dim")  # derived from hidden_size / heads by the config class itself (falcon)
    from porter.introspect.model import _quiet_transformers

    try:
        with _quiet_transformers():  # its warnings about defaults the file does not set
            config = AutoConfig.for_model(cls.model_type, **fields)
    except Exception as exc:  # transformers validates configs with ValueError, TypeError, KeyError...
        raise _Mismatch(f"transformers refuses the config the keys give ({exc})") from None
    config_dict = config.to_dict()
    info = ModelInfo(source=str(path), model_type=cls.model_type, architectures=[], config=config_dict,
                     hparams=hparams_from_config(config, parameters=params), modules=[], parameters=params,
                     ancestry={})
    arch = cls(info)
    try:
        spec = arch.spec()
        written = {k[len(cls.gguf_arch) + 1:]: v for k, v in arch.gguf_kv().items()}
        planned = {t.gguf_name for t in arch.tensor_plans()}
    except (ModelError, TypeError, ValueError, KeyError, ZeroDivisionError) as exc:  # values no checkpoint has
        raise _Mismatch(str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}") from None
    for key, value in kv.items():
        if key not in written:
            raise _Mismatch(f"the file sets {cls.gguf_arch}.{key} = {_show(value)}, which {cls.model_type} has no "
                            "config field for")
        if not _same(value, written[key]):
            raise _Mismatch(f"{cls.gguf_arch}.{key} is {_show(value)} in the file, but the config rebuilt from the "
                            f"keys gives {_show(written[key])}")
    for key in written:
        if key not in kv and key != "context_length":
            raise _Mismatch(f"the file lacks {cls.gguf_arch}.{key}")
    planned &= set(spec.weight_names())  # a tensor the graph does not read is not accounted for
    extra, missing = sorted(set(reader.tensors) - planned), sorted(planned - set(reader.tensors))
    if extra or missing:
        what = [f"unused tensor(s) {', '.join(extra[:4])}" if extra else "", f"no tensor(s) {', '.join(missing[:4])}" if missing else ""]
        raise _Mismatch("the rebuilt model would have " + " and ".join(w for w in what if w))
    return Rebuilt(spec, cls.model_type, config_dict)


def rebuild_spec(reader: GGUFFile, path: Path) -> Rebuilt:
    """The graph spec of a GGUF without one, rebuilt from its llama.cpp keys and tensors, or a
    ModelError saying which plugin was tried and what does not fit."""
    arch = reader.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{path}: this GGUF carries neither a porter graph spec (porter.graph_spec) nor "
                         f"general.architecture; {_RETRY}")
    if not reader.tensors:
        raise ModelError(f"{path}: this GGUF holds no tensors (a vocabulary-only file, as `porter convert "
                         "--vocab-only` writes): it has a tokenizer but no weights to run; convert the checkpoint "
                         "without --vocab-only")
    key = spec_cache.key_of(reader.header())
    hit = spec_cache.load(key, "spec", {"spec": str, "model_type": str, "config": dict})
    if hit is not None:
        try:
            return Rebuilt(loads(hit["spec"]), hit["model_type"], hit["config"])
        except SpecError:  # an entry that no longer parses is rebuilt (and replaced)
            pass
    found = candidates(arch)
    if not found:
        from porter.plugins import architectures

        known = sorted({c.gguf_arch for c in architectures().values()})
        raise ModelError(f"{path}: no porter plugin handles llama.cpp's architecture {arch!r} (plugins cover "
                         f"{', '.join(known)}) and the file carries no porter graph spec; {_RETRY}")
    kv = _arch_keys(reader, arch)
    reasons = []
    for cls in found:
        try:
            rebuilt = _try(cls, reader, kv, path)
        except _Mismatch as exc:
            reasons.append(f"{cls.model_type}: {exc}")
            continue
        spec_cache.store(key, "spec", {"spec": rebuilt.spec.to_json(), "model_type": rebuilt.model_type,
                                       "config": rebuilt.config})
        return rebuilt
    raise ModelError(f"{path}: this GGUF carries no porter graph spec, and its {arch} keys and tensors cannot be "
                     f"rebuilt into one ({'; '.join(reasons)}); {_RETRY}")


__all__ = ["Rebuilt", "candidates", "rebuild_spec"]
