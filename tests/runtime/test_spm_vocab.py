"""Stock GGUFs with a SentencePiece vocabulary (tokenizer.ggml.model = "llama": Llama-2, TinyLlama,
Mistral v0.1): porter rebuilds llama.cpp's SPM tokenizer from tokens + scores + token types
(porter.runtime.ggml_vocab) and tokenizes as the model's own sentencepiece model and transformers'
LlamaTokenizer do (llama.cpp's own tokenization of the same file: bench/spm_vocab.py, where
llama.cpp is installed). The file: porter.testing.spm, trained and written at test time.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm  # the test extra
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.runtime.ggml_vocab import VocabUnsupported, tokenizer_json
from porter.runtime.gguf_file import GGUFFile
from porter.testing.spm import SPECIAL_TEXTS, stock_spm_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    stock, sp_model = stock_spm_files(directory)
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


def test_run_without_a_chat_template_adds_the_files_bos(files, model):
    """`porter run` on a model with no chat template tokenizes the plain prompt with its BOS, as
    llama.cpp does (the default --chat only applies a template the model has)."""
    import re
    import subprocess
    import sys

    prompt = "The class statement"
    done = subprocess.run([sys.executable, "-m", "porter", "run", str(files[0]), "-p", prompt, "-n", "1", "-t", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert model.encode(prompt)[0] == 1  # the file says add_bos_token
    assert f"prompt: {len(model.encode(prompt))} tokens" in re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)


def test_a_file_without_add_bos_token_adds_bos_everywhere(files):
    """llama.cpp's SPM default when the key is absent: the tokenizer and what perplexity/bench
    prepend (the model's add_bos_token) agree."""
    import porter
    from porter.measure.perplexity import bos_for
    from porter.testing.spm import write_stock_gguf

    stock, sp_model, directory = files
    bare = write_stock_gguf(directory / "porter.gguf", sp_model, directory / "no-flags.gguf")
    with porter.load(bare, n_ctx=64, n_threads=1) as m:
        assert m.metadata["add_bos_token"] is True
        assert m.encode("the class")[0] == 1 and bos_for(m) == 1


def test_the_rebuilt_tokenizer_is_cached(files, tmp_path):
    """A stock file's vocabulary is rebuilt into a tokenizer once; later loads read it from the
    spec cache and tokenize identically."""
    from porter.testing.gguf_edit import load_in_child

    first = load_in_child(files[0], tmp_path)
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "specs").iterdir()) == ["spec.json", "tokenizer.json"]
    (entry,) = (tmp_path / "specs").glob("*-tokenizer.json")
    stamp = entry.stat().st_mtime_ns
    second = load_in_child(files[0], tmp_path)
    assert entry.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert first["ids"] == second["ids"] and first["ids"][0] == 1
