"""llama.cpp's tokenizer metadata, read from a transformers checkpoint's tokenizer files.

``tokenizer_kv(model_dir)`` returns the ``tokenizer.*`` keys llama.cpp reads, so stock llama.cpp
can tokenize with a GGUF porter writes, plus the checkpoint's full ``tokenizer.json`` text under
``porter.tokenizer_json`` so porter's runtime rebuilds the exact ``tokenizers.Tokenizer``.

Sources, in order of precedence (the same as llama.cpp's ``convert_hf_to_gguf.py`` and
``gguf.SpecialVocab``): ``tokenizer.json`` (vocabulary, merges, added tokens, post-processor),
``tokenizer_config.json`` (special tokens, ``add_*_token`` flags, chat template),
``special_tokens_map.json``, ``config.json`` and ``generation_config.json`` (``*_token_id``),
``chat_template.jinja`` / ``chat_template.json`` / ``additional_chat_templates/*.jinja``.

Tokenizer models (``tokenizer.ggml.model``), as llama.cpp's converter chooses them:

- ``gpt2``: byte-level BPE without byte fallback (GPT-2, Llama 3, Qwen, SmolLM). Tokens are
  written in the byte-to-unicode spelling of ``tokenizer.json``, merges as ``"a b"``.
- ``llama``: BPE with byte fallback, the sentencepiece-style vocabularies (Llama 2, Mistral,
  Gemma) saved as ``tokenizer.json``. llama.cpp's SPM tokenizer merges by token score, so each
  token scores minus the rank of the first merge that produces it (0 for tokens no merge makes).
  llama.cpp writes real sentencepiece scores when it has ``tokenizer.model``; the ranks order the
  merges the same way ``tokenizers`` applies them.
- ``bert``: WordPiece, with llama.cpp's "phantom space" spelling (``##ing`` -> ``ing``, ``word`` ->
  ``▁word``, control tokens unchanged) and ``tokenizer.ggml.token_type_count``.
- ``t5``: Unigram, with scores and the normalizer's precompiled character map when present
  (not checked against llama.cpp here).

``tokenizer.ggml.pre`` (byte-level BPE and WordPiece only) is found as llama.cpp finds it: the ids
of a fixed check text are hashed and looked up in llama.cpp's table (``_pretokenizers.py``). An
unknown pre-tokenizer is written as ``"default"`` (llama.cpp then splits with the GPT-2 regex and
warns); porter's own runtime does not depend on it, since it tokenizes with ``tokenizer.json``.
sentencepiece-style and Unigram vocabularies get ``"default"``, as llama.cpp writes.

Token types are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Ids the tokenizer does not define, up to the model's ``vocab_size``, become ``[PAD<id>]``, unused.

Special token ids: ``bos``, ``eos``, ``unk``, ``sep``, ``pad``, ``mask`` under llama.cpp's keys,
and ``cls`` under ``tokenizer.ggml.cls_token_id`` (llama.cpp no longer reads that key; as in its
converter, a tokenizer without a BOS token but with a CLS token uses CLS as BOS, and SEP stands in
for a missing EOS). ``add_bos_token`` / ``add_eos_token`` are always written: from
``tokenizer_config.json`` when it says, else from the ``tokenizer.json`` post-processor (what
``tokenizers`` actually adds), else false.

End ids: ``porter.eog_token_ids`` lists the EOS and every id of ``generation_config.json``'s
``eos_token_id`` (a list in Llama 3, Gemma); the first that differs from the EOS (an end of turn
such as ``<|eot_id|>``) also goes under llama.cpp's ``tokenizer.ggml.eot_token_id``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from gguf import GGUFValueType, Keys, TokenType

from porter.convert._pretokenizers import CHECK_TEXT, PRE_TOKENIZER_BY_HASH
from porter.convert.plan import EOG_TOKEN_IDS_KEY, TOKENIZER_JSON_KEY
from porter.errors import ModelError

logger = logging.getLogger(__name__)

TK = Keys.Tokenizer
CLS_ID_KEY = "tokenizer.ggml.cls_token_id"

_SPECIAL_KEYS = {
    "bos": TK.BOS_ID,
    "eos": TK.EOS_ID,
    "unk": TK.UNK_ID,
    "sep": TK.SEP_ID,
    "pad": TK.PAD_ID,
    "cls": CLS_ID_KEY,
    "mask": TK.MASK_ID,
}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special: some checkpoints forget to mark these as special.
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _end_ids(eos: int | None, gen_cfg: dict[str, Any], config: dict[str, Any], n_vocab: int) -> list[int]:
    """The tokenizer's EOS and every id transformers' generate stops on (generation_config's
    ``eos_token_id``, an int or a list; config.json's when it has none), in that order."""
    ids = [] if eos is None else [eos]
    for source in (gen_cfg, config, config.get("text_config") or {}):
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        if value is None:
            continue
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab and i not in ids:
                ids.append(i)
        break
    return ids


def _config_vocab_size(config: dict[str, Any]) -> int | None:
    for holder in (config, config.get("text_config") or {}):
        size = holder.get("vocab_size") if isinstance(holder, dict) else None
        if isinstance(size, int) and size > 0:
            return size
    return None


def _pre_tokenizer_name(tokenizer_json_text: str) -> str:
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json_text)
        tok.no_truncation()  # e.g. all-MiniLM-L6-v2 truncates to 128 tokens; transformers'
        tok.no_padding()  # encode() (which llama.cpp hashes) does neither by default
    except Exception as exc:  # noqa: BLE001 - any failure here only costs the name
        logger.warning("could not load tokenizer.json to identify its pre-tokenizer: %s", exc)
        return "default"
    for add_special in (True, False):
        ids = tok.encode(CHECK_TEXT, add_special_tokens=add_special).ids
        digest = hashlib.sha256(str(ids).encode()).hexdigest()
        if digest in PRE_TOKENIZER_BY_HASH:
            return PRE_TOKENIZER_BY_HASH[digest]
    logger.warning(
        "pre-tokenizer not in llama.cpp's table (fingerprint %s); writing tokenizer.ggml.pre = "
        "'default' (porter's runtime is unaffected; stock llama.cpp may split text differently)",
        digest,
    )
    return "default"


def _merge_strings(merges: list[Any]) -> list[str]:
    out: list[str] = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        elif isinstance(merge, (list, tuple)) and len(merge) == 2:
            # A space inside a part is written as U+0120+..., as gguf-py does (llama.cpp #9692).
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in merge))
        else:
            raise ModelError(f"tokenizer.json has a merge of an unknown form: {merge!r}")
    return out


def _post_processor_flags(post: dict[str, Any] | None, bos: str | None, cls: str | None) -> dict[str, bool]:
    """What the tokenizers post-processor adds around a single sequence (and between a pair)."""
    flags: dict[str, bool] = {}
    if not isinstance(post, dict):
        return flags
    for proc in post.get("processors", [post]) if post.get("type") == "Sequence" else [post]:
        kind = proc.get("type")
        if kind in ("RobertaProcessing", "BertProcessing"):
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = proc.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            flags["bos"] = first is not None and (first in (bos, cls) or bos is None)
            flags["eos"] = last is not None
            pair = proc.get("pair") or []
            seq_at = [i for i, item in enumerate(pair) if "Sequence" in item]
            if len(seq_at) == 2:
                # llama.cpp builds a pair as [bos] A [eos] [sep] B [eos]: a separator is "added"
                # only when there are more special tokens between the sequences than the EOS.
                between = [item for item in pair[seq_at[0] + 1 : seq_at[1]] if "SpecialToken" in item]
                flags["sep"] = len(between) > (1 if flags["eos"] else 0)
    return flags


def _add_space_prefix(tj: dict[str, Any]) -> bool | None:
    """Whether the tokenizer puts a space before the text (sentencepiece's dummy prefix)."""

    def walk(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            yield node
            for child in node.get("normalizers") or node.get("pretokenizers") or []:
                yield from walk(child)

    found: bool | None = None
    for node in walk(tj.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            found = True
    for node in walk(tj.get("pre_tokenizer")):
        kind = node.get("type")
        if kind == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            found = bool(found) or scheme in ("always", "first")
        elif kind == "ByteLevel" and found is None:
            found = bool(node.get("add_prefix_space", False))
    return found


def _chat_templates(model_dir: Path, tok_cfg: dict[str, Any]) -> dict[str, str]:
    """{"default": template, other names: templates} from the places transformers keeps them."""
    found: Any = tok_cfg.get("chat_template")
    if found is None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            found = jinja.read_text(encoding="utf-8")
        else:
            found = _read_json(model_dir / "chat_template.json").get("chat_template")
    templates: dict[str, str] = {}
    if isinstance(found, str):
        templates["default"] = found
    elif isinstance(found, list):
        for choice in found:
            if isinstance(choice, dict) and isinstance(choice.get("template"), str):
                name = re.sub(r"[^A-Za-z0-9]", "_", str(choice.get("name") or "default"))
                templates[name] = choice["template"]
    elif found is not None:
        logger.warning("ignoring a chat_template of type %s", type(found).__name__)
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            name = re.sub(r"[^A-Za-z0-9]", "_", path.stem)
            templates.setdefault(name, path.read_text(encoding="utf-8"))
    return templates


def tokenizer_kv(model_dir: Path | str, *, vocab_size: int | None = None) -> dict[str, object]:
    """llama.cpp tokenizer keys (and ``porter.tokenizer_json``) for the checkpoint in ``model_dir``.

    ``vocab_size`` (default: ``config.json``'s) is the number of rows of the embedding matrix; the
    token list is padded to it. Values are plain Python values except where llama.cpp's type
    differs from porter's defaults (token types are INT32 arrays), which are ``(value, type)``.
    """
    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        hint = (
            " (it has a sentencepiece tokenizer.model: save a fast tokenizer with "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            if (model_dir / "tokenizer.model").is_file()
            else ""
        )
        raise ModelError(f"{model_dir} has no tokenizer.json; porter needs one{hint}")
    tj_text = tj_path.read_text(encoding="utf-8")
    try:
        tj = json.loads(tj_text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{tj_path} is not valid JSON: {exc}") from exc
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    special_map = _read_json(model_dir / "special_tokens_map.json")
    config = _read_json(model_dir / "config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")

    model = tj.get("model") or {}
    kind = model.get("type")
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict) and "id" in a]
    added_by_id = {int(a["id"]): a for a in added}

    # id -> token text, and (Unigram) id -> score
    id_to_tok: dict[int, str] = {}
    unigram_scores: dict[int, float] = {}
    if kind in ("BPE", "WordPiece", "WordLevel"):
        vocab = model.get("vocab") or {}
        id_to_tok = {int(i): t for t, i in vocab.items()}
    elif kind == "Unigram":
        for i, (piece, score) in enumerate(model.get("vocab") or []):
            id_to_tok[i] = piece
            unigram_scores[i] = float(score)
    else:
        raise ModelError(f"{tj_path}: tokenizer model type {kind!r} is not supported")
    for i, a in added_by_id.items():
        id_to_tok[i] = a["content"]
    if not id_to_tok:
        raise ModelError(f"{tj_path} defines no tokens")

    if kind == "WordPiece":
        ggml_model = "bert"
    elif kind == "Unigram":
        ggml_model = "t5"
    elif kind == "BPE" and model.get("byte_fallback"):
        ggml_model = "llama"
    elif kind == "BPE":
        ggml_model = "gpt2"
    else:
        raise ModelError(f"{tj_path}: a {kind} tokenizer has no llama.cpp equivalent")

    n_vocab = vocab_size or _config_vocab_size(config) or (max(id_to_tok) + 1)
    if max(id_to_tok) >= n_vocab:
        raise ModelError(
            f"{tj_path} has token id {max(id_to_tok)} but the model's vocab_size is {n_vocab}; "
            "the tokenizer does not belong to this model"
        )

    # --- special tokens (strings first, as tokenizer_config/special_tokens_map name them)
    names: dict[str, str] = {}
    for typ in _SPECIAL_KEYS:
        for source in (tok_cfg, special_map):
            content = _token_content(source.get(f"{typ}_token"))
            if content:
                names[typ] = content
                break
    if "bos" not in names and "cls" in names:
        names["bos"] = names["cls"]
    if "eos" not in names and "sep" in names:
        names["eos"] = names["sep"]
    if "unk" not in names and isinstance(model.get("unk_token"), str):
        names["unk"] = model["unk_token"]
    tok_to_id: dict[str, int] = {}
    for i, t in sorted(id_to_tok.items(), reverse=True):
        tok_to_id[t] = i  # the lowest id wins for a duplicated text
    for a in reversed(added):  # added tokens take precedence, as in gguf.SpecialVocab
        tok_to_id[a["content"]] = int(a["id"])
    special_ids: dict[str, int] = {}
    for typ, content in names.items():
        if content in tok_to_id:
            special_ids[typ] = tok_to_id[content]
    for source in (config, config.get("text_config") or {}, gen_cfg):
        if not isinstance(source, dict):
            continue
        for typ in _SPECIAL_KEYS:
            value = source.get(f"{typ}_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_vocab:
                special_ids.setdefault(typ, value)

    # --- tokens, types, scores
    merges = _merge_strings(model.get("merges") or []) if kind == "BPE" else []
    special_id_set = {int(a["id"]) for a in added if a.get("special")}
    unk_id = special_ids.get("unk")
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    merge_rank: dict[str, int] = {}
    if ggml_model == "llama":
        for rank, merge in enumerate(merges):
            a, _, b = merge.partition(" ")
            merge_rank.setdefault(a + b, rank)
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        score = 0.0
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            scores.append(-10000.0 if ggml_model in ("llama", "t5") else 0.0)
            continue
        if ggml_model in ("llama", "t5") and i == unk_id:
            ttype = TokenType.UNKNOWN  # as sentencepiece marks it
        elif i in added_by_id:
            if i in special_id_set or _looks_special(tok):
                ttype = TokenType.CONTROL
            else:
                ttype = TokenType.USER_DEFINED
                tok = tok.replace("\u2581", " ")  # llama.cpp matches these in raw text
        elif ggml_model in ("llama", "t5") and _BYTE_TOKEN.fullmatch(tok):
            ttype = TokenType.BYTE
        else:
            ttype = TokenType.NORMAL
        if ggml_model == "llama":
            score = -float(merge_rank[tok]) if tok in merge_rank else 0.0
        elif ggml_model == "t5":
            score = unigram_scores.get(i, 0.0)
        if ggml_model == "bert" and ttype != TokenType.CONTROL:
            tok = tok[2:] if tok.startswith("##") else "\u2581" + tok
        tokens.append(tok)
        types.append(int(ttype))
        scores.append(score)

    kv: dict[str, object] = {
        TK.MODEL: ggml_model,
        TK.PRE: _pre_tokenizer_name(tj_text) if ggml_model in ("gpt2", "bert") else "default",
        TK.LIST: tokens,
        TK.TOKEN_TYPE: (types, GGUFValueType.INT32),
    }
    if ggml_model in ("llama", "t5"):
        kv[TK.SCORES] = scores
    if ggml_model == "gpt2":
        if not merges:
            raise ModelError(f"{tj_path}: a byte-level BPE tokenizer without merges")
        kv[TK.MERGES] = merges
    if ggml_model in ("gpt2", "llama"):
        kv[TK.ADD_PREFIX] = bool(_add_space_prefix(tj))  # what tokenizers does; no evidence: no
    if ggml_model == "bert":
        kv[TK.TOKEN_TYPE_COUNT] = int(config.get("type_vocab_size", 1) or 1)
    if ggml_model == "t5":
        charsmap = (tj.get("normalizer") or {}).get("precompiled_charsmap")
        if isinstance(charsmap, str) and charsmap:
            kv[TK.PRECOMPILED_CHARSMAP] = (list(base64.b64decode(charsmap)), GGUFValueType.UINT8)
        kv[TK.ADD_PREFIX] = True
        kv[TK.REMOVE_EXTRA_WS] = True

    for typ, key in _SPECIAL_KEYS.items():
        if typ in special_ids:
            kv[key] = special_ids[typ]
    ends = _end_ids(special_ids.get("eos"), gen_cfg, config, n_vocab)
    if ends:
        kv[EOG_TOKEN_IDS_KEY] = (ends, GGUFValueType.UINT32)
        turn_end = [i for i in ends if i != special_ids.get("eos")]
        if turn_end:
            kv[TK.EOT_ID] = turn_end[0]

    flags = _post_processor_flags(tj.get("post_processor"), names.get("bos"), names.get("cls"))
    for typ in ("bos", "eos", "sep"):
        value = tok_cfg.get(f"add_{typ}_token")
        if isinstance(value, bool):
            flags[typ] = value
    kv[TK.ADD_BOS] = bool(flags.get("bos", False))
    kv[TK.ADD_EOS] = bool(flags.get("eos", False))
    if "sep" in flags:
        kv[TK.ADD_SEP] = bool(flags["sep"])

    templates = _chat_templates(model_dir, tok_cfg)
    if "default" in templates:
        kv[TK.CHAT_TEMPLATE] = templates["default"]
    others = sorted(n for n in templates if n != "default")
    for name in others:
        kv[TK.CHAT_TEMPLATE_N.format(name=name)] = templates[name]
    if others:
        kv[TK.CHAT_TEMPLATES] = others

    kv[TOKENIZER_JSON_KEY] = tj_text
    return kv


__all__ = ["tokenizer_kv"]
