"""A ``tokenizers`` tokenizer from llama.cpp's ``tokenizer.ggml.*`` keys (GGUFs without porter's
``porter.tokenizer_json``, such as those llama.cpp's converter writes).

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``) is rebuilt: vocabulary, merges, control
tokens as special added tokens, a BOS prepended when ``add_bos_token`` says so, and the
pre-tokenizer ``tokenizer.ggml.pre`` names. llama.cpp implements each pre-tokenizer natively
(``llama-vocab.cpp``); the table below holds those porter reproduces, as the ``tokenizers``
pre-tokenizer of the checkpoints they come from. Any other name, or another tokenizer model, is
reported when the tokenizer is first needed (token ids still work).
"""

from __future__ import annotations

from porter.runtime.gguf_file import GGUFFile

# llama.cpp's names -> the pre-tokenizer (as tokenizers JSON). "smollm" and the others of its
# group split every digit apart, then apply GPT-2's split.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": _BYTE_LEVEL,
    "phi-2": _BYTE_LEVEL,
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


class VocabUnsupported(Exception):
    """Why the file's vocabulary cannot be rebuilt (the message names the key)."""


def tokenizer_json(reader: GGUFFile) -> str:
    """The tokenizers JSON for the file's ``tokenizer.ggml.*`` keys, or :class:`VocabUnsupported`."""
    import json

    model = reader.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise VocabUnsupported(f"tokenizer.ggml.model = {model!r}: porter rebuilds only byte-level BPE (\"gpt2\") "
                               "vocabularies from llama.cpp's keys")
    pre = reader.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise VocabUnsupported(f"tokenizer.ggml.pre = {pre!r} is a pre-tokenizer porter does not reproduce "
                               f"(it does {', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = reader.get("tokenizer.ggml.tokens") or []
    merges = reader.get("tokenizer.ggml.merges") or []
    types = reader.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise VocabUnsupported("tokenizer.ggml.tokens is missing, or its length differs from tokenizer.ggml.token_type's")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == _CONTROL}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)]
    post = None
    bos = reader.get("tokenizer.ggml.bos_token_id")
    if reader.get("tokenizer.ggml.add_bos_token") and bos is not None and 0 <= int(bos) < len(tokens):
        b = tokens[int(bos)]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [int(bos)], "tokens": [b]}}}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    })


__all__ = ["PRE_TOKENIZERS", "VocabUnsupported", "tokenizer_json"]
