"""What a GGUF says about the model it holds, and the file name it gets by default, as llama.cpp's
``convert_hf_to_gguf.py`` does both: gguf-py's ``Metadata`` heuristics (the folder or model id
name, the model card, config.json) give ``general.name``, ``basename``, ``finetune``,
``version``, ``size_label`` (from the parameter count, ``8x7B`` style for experts) and the rest;
``naming_convention`` gives ``SmolLM2-135M-Instruct-Q8_0.gguf``."""

from __future__ import annotations

from pathlib import Path

import gguf

# Metadata fields -> general.* keys, the ones convert_hf_to_gguf.py writes when it knows them.
_FIELDS = {
    "name": "general.name", "author": "general.author", "version": "general.version",
    "organization": "general.organization", "finetune": "general.finetune", "basename": "general.basename",
    "description": "general.description", "size_label": "general.size_label", "license": "general.license",
    "license_name": "general.license.name", "license_link": "general.license.link", "url": "general.url",
    "repo_url": "general.repo_url", "tags": "general.tags", "languages": "general.languages",
}


def describe(model_dir: Path, params: tuple[int, int, int, int], *, model_id: str | None = None,
             fallback_name: str = "") -> gguf.Metadata:
    """gguf-py's metadata for a checkpoint; ``params`` is ``GGUFWriter.get_total_parameter_count()``
    (total, shared, per-expert, expert count). A hub snapshot's folder is named after a commit, so
    for a model id the name comes from the id."""
    total, shared, expert, n_expert = params
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if model_id:
        named = gguf.Metadata.load(None, Path(model_id), None, total)
        for attr in ("name", "basename", "finetune", "version", "organization"):
            if getattr(named, attr):
                setattr(metadata, attr, getattr(named, attr))
    if not metadata.name:
        metadata.name = fallback_name or model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, n_expert)
    return metadata


def general_kv(metadata: gguf.Metadata) -> dict[str, object]:
    """The general.* keys of what ``metadata`` knows (strings and lists of strings only)."""
    kv: dict[str, object] = {}
    for attr, key in _FIELDS.items():
        value = getattr(metadata, attr, None)
        if isinstance(value, str) and value.strip():
            kv[key] = value.strip()
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            kv[key] = list(value)
    return kv


def default_file_name(metadata: gguf.Metadata, outtype: str, *, vocab_only: bool = False) -> str:
    """``Name-SIZE-Finetune-Version-TYPE.gguf`` (GGUF's naming convention, as convert_hf_to_gguf.py);
    a vocabulary-only file is ``Name-SIZE-Finetune-vocab.gguf``."""
    stem = gguf.naming_convention(metadata.name, metadata.basename, metadata.finetune, metadata.version,
                                  metadata.size_label, None if vocab_only else outtype,
                                  model_type="vocab" if vocab_only else None)
    return f"{stem}.gguf"
