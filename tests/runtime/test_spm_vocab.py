"""Stock GGUFs with a SentencePiece vocabulary (tokenizer.ggml.model = "llama": Llama-2, TinyLlama,
Mistral v0.1): porter rebuilds llama.cpp's SPM tokenizer from tokens + scores + token types
(porter.runtime.ggml_vocab) and tokenizes as the model's own sentencepiece model, transformers'
LlamaTokenizer and llama.cpp do.

The file is written here as llama.cpp's converter writes one (its _create_vocab_sentencepiece): a
tiny random llama checkpoint, converted by porter, its porter.* and tokenizer.* keys replaced by
the keys of a sentencepiece BPE model trained at test time (byte fallback, identity normalization,
whitespace kept: the options Llama's tokenizer was trained with).
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm  # the test extra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.runtime.ggml_vocab import VocabUnsupported, tokenizer_json
from porter.runtime.gguf_file import GGUFFile

# A little text beyond the Python reference so that some multi-byte characters are pieces of
# their own and others fall back to bytes.
EXTRA = "naïve café über Straße déjà vu, 日本語のテキスト, 中文文本, emoji 🙂🙂 ñandú\n"
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")  # porter's encode parses special tokens in text, as for every GGUF


def _train(directory: Path) -> Path:
    from porter.measure.text import python_reference

    text = python_reference(200_000) + ("\n" + EXTRA) * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(directory / "sp"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return directory / "sp.model"


def _token_type(sp, i: int) -> int:
    """llama.cpp's token type of piece ``i`` (its converter's mapping of sentencepiece's)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 5 if sp.is_unused(i) else 1


def write_stock_gguf(porter_file: Path, sp_model: Path, out: Path, **flags) -> Path:
    """``porter_file`` without porter's keys, its vocabulary the sentencepiece model's as llama.cpp's
    converter writes it; ``flags`` (add_bos_token=..., add_space_prefix=...) add those keys."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    reader = GGUFReader(porter_file)
    writer = GGUFWriter(out, "llama")
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "porter.", "tokenizer.")) or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = {"sub_type": field.types[-1]} if kind == GGUFValueType.ARRAY else {}
        writer.add_key_value(name, field.contents(), kind, **sub)
    n = sp.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([_token_type(sp, i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    for key, value in flags.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    directory = tmp_path_factory.mktemp("spm")
    sp_model = _train(directory)
    cls = architectures()["llama"]
    vocab_size = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    ckpt = tiny_checkpoint(cls, directory / "ckpt", seed=0, vocab_size=vocab_size)
    convert(ckpt, directory / "porter.gguf", "f32", progress=False, force=True, arch_cls=cls)
    stock = write_stock_gguf(directory / "porter.gguf", sp_model, directory / "stock.gguf", add_bos_token=True,
                             add_eos_token=False)
    return stock, sp_model, directory


@pytest.fixture(scope="module")
def model(files):
    import porter

    # closed at the end of the module: tests/runtime/test_lifetimes.py counts live ggml objects
    with porter.load(files[0], n_ctx=64, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def references(files):
    """The model's sentencepiece processor, and transformers' LlamaTokenizer of it."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(files[1]))
    # what LlamaTokenizer.from_pretrained builds from a tokenizer.model (its SentencePieceExtractor:
    # pieces in id order, transformers' own merges); read here with sentencepiece, since the
    # extractor's protobuf parser is not among porter's dependencies. legacy=True: the prefix "▁"
    # on every stretch of text, as sentencepiece and llama.cpp add it.
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, legacy=True)
    return sp, hf


def test_the_file_is_stock_and_the_vocabulary_rebuilt(files, model):
    with GGUFFile(files[0]) as f:
        assert f.get("tokenizer.ggml.model") == "llama" and f.get("porter.tokenizer_json") is None
        assert f.get("tokenizer.ggml.merges") is None
    assert model.metadata["spec_source"].startswith("rebuilt by ")
    assert model.metadata.get("tokenizer_json")
    assert len(model.logits(model.encode("The class statement"))) == 4  # BOS + 3 pieces, it runs


WORDS = ["the", "The", "class", " ", "  ", "\n", "\n\n", "\t", "é", "日本語", "中文", "🙂", "ñandú", "12345",
         "def", "x", ".", ",", "(", ")", "über", "ß", "\u0301", "\x00", "\r\n", "  \n "]
texts = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=12).map("".join),
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=4)), max_size=8).map("".join),
).filter(lambda t: not any(s in t for s in SPECIAL_TEXTS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_encode_and_decode_equal_sentencepiece_and_transformers(model, references, text):
    sp, hf = references
    ids = model.encode(text)
    assert ids == [sp.bos_id()] + sp.encode(text), text
    assert model.encode(text, add_special_tokens=False) == sp.encode(text)
    decoded = model.decode(ids)
    assert decoded == sp.decode(ids[1:])
    if "\u2581" not in text:  # sentencepiece's whitespace symbol decodes as a space
        assert decoded == text
    # transformers' Metaspace pre-tokenizer adds no "▁" in front of a text that already begins
    # with one (or a space): there it differs from sentencepiece and llama.cpp, which add it
    if not text.startswith((" ", "\u2581")):
        assert ids == hf.encode(text), text
        assert decoded == hf.decode(ids, skip_special_tokens=True)


def test_transformers_differs_only_by_its_prefix_rule(model, references):
    """The texts skipped above: transformers' ids are sentencepiece's for the text without its
    leading space, where the others keep it."""
    sp, hf = references
    for text in (" lead", "  two spaces", " \nnewline"):
        assert model.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert hf.encode(text) == [sp.bos_id()] + sp.encode(text[1:])


_LLAMA_CPP_CHILD = """
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
out = []
for text in json.load(sys.stdin):
    out.append(m.tokenize(text.encode("utf-8"), add_bos=True, special=False))
print(json.dumps(out))
"""


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = WORDS + ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(3)) for _ in range(40)]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 10))) for _ in range(n)]
    return [t for t in texts if not any(s in t for s in SPECIAL_TEXTS)] + [""]


def _llama_cpp_ids(gguf: Path, texts: list[str]) -> list[list[int]]:
    # a child process: llama.cpp's ggml and porter's never share one
    done = subprocess.run([sys.executable, "-c", _LLAMA_CPP_CHILD, str(gguf)], input=json.dumps(texts),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (the bench extra)")


@needs_llama_cpp
def test_llama_cpp_tokenizes_the_file_as_porter_does(files, model):
    texts = _random_texts(400, seed=0)
    got = [model.encode(t) for t in texts]
    assert got == _llama_cpp_ids(files[0], texts)


@needs_llama_cpp
@pytest.mark.parametrize("flags", [{"add_space_prefix": False}, {"add_bos_token": False, "add_eos_token": True}])
def test_the_tokenizer_flags_mean_what_llama_cpp_makes_of_them(files, flags):
    import porter

    stock, sp_model, directory = files
    variant = write_stock_gguf(directory / "porter.gguf", sp_model, directory / f"{'-'.join(flags)}.gguf", **flags)
    texts = _random_texts(100, seed=1)
    with porter.load(variant, n_ctx=64, n_threads=1) as m:
        got = [m.encode(t) for t in texts]
        decoded = [m.decode(ids) for ids in got]
    want = _llama_cpp_ids(variant, texts)
    if flags.get("add_eos_token"):  # llama.cpp's tokenize(add_bos=True) also adds EOS when the file says so
        assert all(ids[-1:] == [2] for ids in want)
    assert got == want
    assert decoded == texts


def test_a_vocabulary_without_scores_is_refused(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "v.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    writer.add_token_types([2, 3, 3, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with GGUFFile(tmp_path / "v.gguf") as f, pytest.raises(VocabUnsupported, match="tokenizer.ggml.scores"):
        tokenizer_json(f)
