"""A ``tokenizers`` tokenizer from llama.cpp's ``tokenizer.ggml.*`` keys (GGUFs without porter's
``porter.tokenizer_json``, such as those llama.cpp's converter writes).

Byte-level BPE (``tokenizer.ggml.model = "gpt2"``) is rebuilt: vocabulary, merges, control
tokens as special added tokens, a BOS prepended when ``add_bos_token`` says so, and the
pre-tokenizer ``tokenizer.ggml.pre`` names. llama.cpp implements each pre-tokenizer natively
(``llama-vocab.cpp``); the table below holds those porter reproduces, as the ``tokenizers``
pre-tokenizer of the checkpoints they come from. Any other name, or another tokenizer model, is
reported when the tokenizer is first needed (token ids still work).

SentencePiece vocabularies (``tokenizer.ggml.model = "llama"``: Llama-2, TinyLlama, Mistral v0.1)
are rebuilt as llama.cpp's SPM tokenizer (``llm_tokenizer_spm`` in ``llama-vocab.cpp``) encodes:

- each stretch of text between special tokens gets a space in front when ``add_space_prefix``
  says so (llama.cpp's default for SPM: yes), then every space becomes "▁";
- starting from single characters, the adjacent pair whose concatenation is a token with the
  highest score merges first, until no pair makes a token; a character no token covers is emitted
  as its UTF-8 bytes (the ``<0xNN>`` tokens).

That is a ``tokenizers`` BPE with byte fallback whose merges are every split of every token into
two tokens, ranked by the joined token's score (ties by id), behind a Prepend("▁") + Replace
normalizer; BOS (and EOS) are added as ``add_bos_token`` / ``add_eos_token`` say (SPM defaults:
BOS yes, EOS no). Decoding is transformers' (``LlamaTokenizer``): "▁" back to spaces, byte tokens
joined into characters, the prefix space removed.
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
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # llama.cpp's token types (6: a byte)


class VocabUnsupported(Exception):
    """Why the file's vocabulary cannot be rebuilt (the message names the key)."""


def tokenizer_json(reader: GGUFFile) -> str:
    """The tokenizers JSON for the file's ``tokenizer.ggml.*`` keys, or :class:`VocabUnsupported`."""
    import json

    model = reader.get("tokenizer.ggml.model")
    if model == "llama":
        return json.dumps(_sentencepiece(reader))
    if model != "gpt2":
        raise VocabUnsupported(f"tokenizer.ggml.model = {model!r}: porter rebuilds byte-level BPE (\"gpt2\") and "
                               "SentencePiece (\"llama\") vocabularies from llama.cpp's keys, not this one")
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
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": _bos_eos(reader, tokens, bool(reader.get("tokenizer.ggml.add_bos_token")), False),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    })


def _bos_eos(reader: GGUFFile, tokens: list[str], add_bos: bool, add_eos: bool) -> dict | None:
    """A TemplateProcessing that puts BOS in front and/or EOS at the end (None: neither)."""
    def end(name: str, wanted: bool) -> int | None:
        i = reader.get(f"tokenizer.ggml.{name}_token_id")
        return int(i) if wanted and i is not None and 0 <= int(i) < len(tokens) else None

    front, back = end("bos", add_bos), end("eos", add_eos)
    if front is None and back is None:
        return None

    def piece(i: int | None, type_id: int) -> list[dict]:
        return [] if i is None else [{"SpecialToken": {"id": tokens[i], "type_id": type_id}}]

    def sequence(name: str, type_id: int) -> list[dict]:
        return piece(front, type_id) + [{"Sequence": {"id": name, "type_id": type_id}}] + piece(back, type_id)

    special = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in (front, back) if i is not None}
    return {"type": "TemplateProcessing", "single": sequence("A", 0), "pair": sequence("A", 0) + sequence("B", 1),
            "special_tokens": special}


def _flag(reader: GGUFFile, key: str, default: bool) -> bool:
    value = reader.get(key)
    return default if value is None else bool(value)


def _sentencepiece(reader: GGUFFile) -> dict:
    """The tokenizers JSON equivalent to llama.cpp's SPM tokenizer on these keys (module docstring)."""
    tokens = reader.get("tokenizer.ggml.tokens") or []
    scores = reader.get("tokenizer.ggml.scores")
    types = reader.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise VocabUnsupported("tokenizer.ggml.tokens is missing, or its length differs from tokenizer.ggml.token_type's")
    if scores is None or len(scores) != len(tokens):
        raise VocabUnsupported("a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token (they rank its "
                               "merges)")
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated text means its last id, as llama.cpp's map does
    ranked = []
    for i, text in enumerate(tokens):
        # every way the token splits into two tokens is a merge that forms it (llama.cpp merges any
        # adjacent pair whose concatenation is a token)
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], left, right))
    ranked.sort()
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind != _USER_DEFINED}
             for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)]
    unk = reader.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(tokens) else None
    prefix = _flag(reader, "tokenizer.ggml.add_space_prefix", True)
    replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace_space]} \
        if prefix else replace_space
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": _bos_eos(reader, tokens, _flag(reader, "tokenizer.ggml.add_bos_token", True),
                                   _flag(reader, "tokenizer.ggml.add_eos_token", False)),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[left, right] for *_, left, right in ranked]},
    }


__all__ = ["PRE_TOKENIZERS", "VocabUnsupported", "tokenizer_json"]
