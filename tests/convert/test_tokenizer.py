"""llama.cpp tokenizer keys from tokenizer files: real checkpoints and small hand-made ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFValueType, TokenType

from porter.convert.tokenizer import tokenizer_kv
from porter.errors import ModelError

K = "tokenizer.ggml."


def values(kv: dict) -> dict:
    """The plain values (tokenizer_kv gives a few as (value, gguf type))."""
    return {k: v[0] if isinstance(v, tuple) else v for k, v in kv.items()}


# ----------------------------------------------------------------------------- real checkpoints
def test_smollm2(smollm2_dir):
    kv = tokenizer_kv(smollm2_dir)
    v = values(kv)
    assert v[K + "model"] == "gpt2"
    assert v[K + "pre"] == "smollm"  # llama.cpp's name for this pre-tokenizer
    assert len(v[K + "tokens"]) == 49152 and len(v[K + "token_type"]) == 49152
    assert kv[K + "token_type"][1] == GGUFValueType.INT32
    assert v[K + "tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert v[K + "token_type"].count(int(TokenType.CONTROL)) == 17
    assert set(v[K + "token_type"]) == {int(TokenType.NORMAL), int(TokenType.CONTROL)}
    assert len(v[K + "merges"]) == 48900 and v[K + "merges"][0] == "Ġ t"
    assert (v[K + "bos_token_id"], v[K + "eos_token_id"], v[K + "unknown_token_id"], v[K + "padding_token_id"]) == (1, 2, 0, 2)
    assert v[K + "add_bos_token"] is False and v[K + "add_eos_token"] is False
    assert v[K + "add_space_prefix"] is False
    assert "<|im_start|>" in v["tokenizer.chat_template"]
    assert v["porter.tokenizer_json"] == (smollm2_dir / "tokenizer.json").read_text(encoding="utf-8")


def test_smollm2_matches_llama_cpps_own_gguf(smollm2_dir):
    """The keys equal those llama.cpp's converter wrote into the GGUF the checkpoint came from."""
    from porter.examples import gguf_metadata, smollm2_gguf

    names = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
             "unknown_token_id", "padding_token_id", "add_bos_token", "add_space_prefix")
    theirs = gguf_metadata(smollm2_gguf(), {K + n for n in names} | {"tokenizer.chat_template"})
    v = values(tokenizer_kv(smollm2_dir))
    for name in names:
        assert theirs[K + name] == v[K + name], name
    assert theirs["tokenizer.chat_template"] == v["tokenizer.chat_template"]


def test_minilm_is_bert():
    from porter.examples import minilm_dir

    folder = minilm_dir()
    v = values(tokenizer_kv(folder))
    assert v[K + "model"] == "bert"
    assert v[K + "pre"] == "jina-v2-en"  # what llama.cpp's table says for bert-base-uncased's splitting
    tokens, types = v[K + "tokens"], v[K + "token_type"]
    assert len(tokens) == 30522 == len(types)
    # llama.cpp's "phantom space" spelling: word starts get ▁, continuations lose ##.
    assert tokens[101] == "[CLS]" and types[101] == int(TokenType.CONTROL)
    assert tokens[1996] == "▁the" and types[1996] == int(TokenType.NORMAL)
    assert "s" in tokens and "##s" not in tokens
    assert (v[K + "bos_token_id"], v[K + "eos_token_id"], v[K + "seperator_token_id"]) == (101, 102, 102)
    assert (v[K + "cls_token_id"], v[K + "padding_token_id"], v[K + "mask_token_id"], v[K + "unknown_token_id"]) == (101, 0, 103, 100)
    assert v[K + "add_bos_token"] is True and v[K + "add_eos_token"] is True
    assert v[K + "token_type_count"] == 2
    assert K + "merges" not in v and K + "scores" not in v
    assert json.loads(v["porter.tokenizer_json"])["model"]["type"] == "WordPiece"


# ----------------------------------------------------------------------------- hand-made tokenizers
def save(folder: Path, tokenizer, **files) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        name = name.replace("__", ".")
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def sentencepiece_style(tmp_path: Path, **files) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "a": 5, "b": 6, "ab": 7, "▁ab": 8, "c": 9}
    merges = [("a", "b"), ("▁", "ab")]
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<unk>", special=True), AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.add_tokens([AddedToken("<tool>", special=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    files.setdefault("tokenizer_config__json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return save(tmp_path / "spm", tok, **files)


def test_sentencepiece_style_bpe_is_llama(tmp_path):
    folder = sentencepiece_style(tmp_path, config__json={"vocab_size": 13})
    kv = tokenizer_kv(folder)
    v = values(kv)
    assert v[K + "model"] == "llama" and v[K + "pre"] == "default"
    assert v[K + "tokens"][:11] == ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "a", "b", "ab", "▁ab", "c", "<tool>"]
    assert v[K + "tokens"][11:] == ["[PAD11]", "[PAD12]"]  # padded to the model's vocab_size
    T = TokenType
    assert v[K + "token_type"] == [int(t) for t in (T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE, T.NORMAL, T.NORMAL,
                                                    T.NORMAL, T.NORMAL, T.NORMAL, T.NORMAL, T.USER_DEFINED, T.UNUSED, T.UNUSED)]
    # Scores order the merges as tokenizers applies them: "ab" (rank 0) before "▁ab" (rank 1).
    assert v[K + "scores"][7] == 0.0 and v[K + "scores"][8] == -1.0
    assert K + "merges" not in v
    assert (v[K + "bos_token_id"], v[K + "eos_token_id"], v[K + "unknown_token_id"]) == (1, 2, 0)
    assert v[K + "add_bos_token"] is True and v[K + "add_eos_token"] is False
    assert v[K + "add_space_prefix"] is True  # the Prepend("▁") normalizer


def test_tokenizer_config_flags_win(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "add_eos_token": True,
              "chat_template": "{{ messages }}"}
    folder = sentencepiece_style(tmp_path, tokenizer_config__json=config)
    v = values(tokenizer_kv(folder))
    assert v[K + "add_bos_token"] is False and v[K + "add_eos_token"] is True
    assert v["tokenizer.chat_template"] == "{{ messages }}"
    assert len(v[K + "tokens"]) == 11  # no config.json: the tokenizer's own size


def test_chat_templates_from_files(tmp_path):
    folder = sentencepiece_style(tmp_path, chat_template__jinja="JINJA")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool-use.jinja").write_text("TOOLS")
    v = values(tokenizer_kv(folder))
    assert v["tokenizer.chat_template"] == "JINJA"
    assert v["tokenizer.chat_template.tool_use"] == "TOOLS"
    assert v["tokenizer.chat_templates"] == ["tool_use"]


def test_named_chat_templates_in_config(tmp_path):
    config = {"bos_token": "<s>", "chat_template": [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]}
    v = values(tokenizer_kv(sentencepiece_style(tmp_path, tokenizer_config__json=config)))
    assert v["tokenizer.chat_template"] == "D" and v["tokenizer.chat_template.rag"] == "R"


def test_unigram_is_t5(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram([("<unk>", 0.0), ("▁a", -1.5), ("b", -2.5)], unk_id=0, byte_fallback=False))
    v = values(tokenizer_kv(save(tmp_path / "uni", tok, tokenizer_config__json={"unk_token": "<unk>"})))
    assert v[K + "model"] == "t5"
    assert v[K + "scores"] == [0.0, -1.5, -2.5]
    assert v[K + "token_type"][0] == int(TokenType.UNKNOWN)


def test_errors(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json"):
        tokenizer_kv(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        tokenizer_kv(tmp_path)
    folder = sentencepiece_style(tmp_path, config__json={"vocab_size": 4})
    with pytest.raises(ModelError, match="vocab_size is 4"):
        tokenizer_kv(folder)


def test_unknown_pre_tokenizer_is_default(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {c: i for i, c in enumerate("abcdefghij")}
    vocab["ab"] = 10
    tok = Tokenizer(BPE(vocab, [("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    v = values(tokenizer_kv(save(tmp_path / "odd", tok)))
    assert v[K + "model"] == "gpt2" and v[K + "pre"] == "default" and v[K + "merges"] == ["a b"]


def test_every_end_id_is_written(tmp_path):
    """generation_config's list (the Llama 3 / Gemma pattern: eos_token is not the end of turn):
    all ids under porter.eog_token_ids, the end of turn under llama.cpp's eot key."""
    folder = sentencepiece_style(tmp_path, generation_config__json={"eos_token_id": [10, 2]},
                                 config__json={"vocab_size": 13, "eos_token_id": 2})
    kv = tokenizer_kv(folder)
    v = values(kv)
    assert v[K + "eos_token_id"] == 2
    assert v["porter.eog_token_ids"] == [2, 10] and kv["porter.eog_token_ids"][1] == GGUFValueType.UINT32
    assert v[K + "eot_token_id"] == 10


def test_a_single_end_id_has_no_eot(tmp_path):
    v = values(tokenizer_kv(sentencepiece_style(tmp_path, config__json={"vocab_size": 13, "eos_token_id": 2})))
    assert v["porter.eog_token_ids"] == [2] and K + "eot_token_id" not in v
