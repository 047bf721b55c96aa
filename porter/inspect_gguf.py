"""``porter inspect FILE.gguf``: what a GGUF holds (architecture, hparams, tensor types and sizes,
tokenizer, whether it carries a porter graph spec), read from its header without loading weights."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from porter.errors import ModelError

SPEC_KEY = "porter.graph_spec"
TOKENIZER_KEY = "porter.tokenizer_json"


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _file_type_name(value) -> str | None:
    from gguf import LlamaFileType

    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return str(value)


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """A JSON-serializable summary of the GGUF at ``path``."""
    from porter.runtime.gguf_file import GGUFFile
    from porter.spec import loads

    path = Path(path)
    with GGUFFile(path) as reader:
        arch = reader.get("general.architecture")
        spec_text = reader.get(SPEC_KEY)
        spec, source, problem = None, None, None
        if isinstance(spec_text, str):
            spec, source = loads(spec_text), "file"
        else:
            from porter.runtime.stock import rebuild_spec

            try:
                rebuilt = rebuild_spec(reader, path)
                spec, source = rebuilt.spec, f"rebuilt by {rebuilt.model_type} from llama.cpp's keys"
            except ModelError as exc:
                problem = str(exc)
        types, sizes = Counter(), Counter()
        n_elements = 0
        for t in reader.tensors.values():
            name = _type_name(t.type)
            types[name] += 1
            sizes[name] += max(t.nbytes, 0)
            n_elements += math.prod(t.ne)
        tokens = reader.get("tokenizer.ggml.tokens")
        vocab_problem = None
        if reader.get(TOKENIZER_KEY) is None and tokens is not None:
            from porter.runtime.ggml_vocab import VocabUnsupported, tokenizer_json

            try:
                tokenizer_json(reader)
            except VocabUnsupported as exc:
                vocab_problem = str(exc)
        prefix = f"{arch}."
        return {
            "file": str(path),
            "file_bytes": reader.size,  # all shards of a split file
            "shards": [str(shard.path) for shard in reader.shards],
            "gguf_version": reader.version,
            "architecture": arch,
            "name": reader.get("general.name"),
            "file_type": _file_type_name(reader.get("general.file_type")),
            "porter_spec": spec is not None and source == "file",
            "spec_source": source,
            "spec_problem": problem,
            "model_type": spec.architecture if spec is not None else None,
            "hparams": dict(spec.hparams) if spec is not None else None,
            "llama_cpp_keys": {k[len(prefix):]: reader.get(k) for k in reader.keys() if k.startswith(prefix)},
            "n_metadata_keys": len(reader.keys()),
            "n_tensors": len(reader.tensors),
            "n_parameters": n_elements,
            "tensor_types": dict(types.most_common()),
            "tensor_bytes": {k: sizes[k] for k, _ in types.most_common()},
            "tokenizer": {
                "kind": "porter tokenizer.json" if reader.get(TOKENIZER_KEY) is not None else reader.get("tokenizer.ggml.model"),
                "ggml_model": reader.get("tokenizer.ggml.model"),
                "pre": reader.get("tokenizer.ggml.pre"),
                "vocab_size": len(tokens) if tokens is not None else None,
                "bos_token_id": reader.get("tokenizer.ggml.bos_token_id"),
                "eos_token_id": reader.get("tokenizer.ggml.eos_token_id"),
                "chat_template": reader.get("tokenizer.chat_template") is not None,
                "problem": vocab_problem,
            },
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} values: {', '.join(map(str, v[:4]))}, ...]"
    return str(v)


def format_summary(s: dict[str, Any]) -> str:
    shards = f" in {len(s['shards'])} shards" if len(s.get("shards", [])) > 1 else ""
    lines = [f"{s['file']}: GGUF v{s['gguf_version']}, {_mib(s['file_bytes'])}{shards}, {s['n_tensors']} tensors, "
             f"{s['n_parameters'] / 1e6:.1f}M parameters, {s['n_metadata_keys']} metadata keys",
             f"architecture: {s['architecture']} (llama.cpp)" + (f", porter model_type {s['model_type']}" if s["model_type"] else ""),
             f"name: {s['name']}", f"file type: {s['file_type']}"]
    if s["porter_spec"]:
        lines.append("graph spec: porter.graph_spec present")
    elif s["spec_source"]:
        lines.append(f"graph spec: none in the file; {s['spec_source']}")
    else:
        lines.append(f"graph spec: none, and none can be rebuilt: {s['spec_problem']}")
    lines.append("tensor types: " + ", ".join(f"{t} x{n} ({_mib(s['tensor_bytes'][t])})" for t, n in s["tensor_types"].items()))
    tok = s["tokenizer"]
    vocab = f", {tok['vocab_size']} tokens" if tok["vocab_size"] is not None else ""
    pre = f", pre-tokenizer {tok['pre']}" if tok["pre"] else ""
    lines.append(f"tokenizer: {tok['kind']}{vocab}{pre}, bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, "
                 f"chat template {'yes' if tok['chat_template'] else 'no'}")
    if tok["problem"]:
        lines.append(f"  not usable by porter: {tok['problem']}")
    if s["hparams"]:
        lines.append("hparams:")
        lines += [f"  {k} = {_value(v)}" for k, v in s["hparams"].items()]
    lines.append("llama.cpp keys:")
    lines += [f"  {s['architecture']}.{k} = {_value(v)}" for k, v in s["llama_cpp_keys"].items()]
    return "\n".join(lines)


def to_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2, default=str)


__all__ = ["format_summary", "gguf_summary", "is_gguf", "to_json"]
