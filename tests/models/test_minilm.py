"""The real all-MiniLM-L6-v2 (bert) checkpoint: porter's sentence embeddings equal transformers'
mean-pooled, L2-normalized embeddings (sentence-transformers' recipe), computed here at run time."""

from __future__ import annotations

import numpy as np
import pytest

import porter
from porter.errors import ModelError

SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "porter ports Hugging Face architectures to ggml, with parity proof.",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Numbers like 3.14159 and 2025-01-01, UPPER case, and ünïcödé.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from porter.examples import minilm_dir
    from porter.pipeline import convert

    try:
        d = minilm_dir()
    except ModelError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("minilm") / "minilm.f32.gguf"
    convert(d, out, "f32", progress=False)
    m = porter.load(out, n_threads=2)
    yield d, out, m
    m.close()


def _reference(model_dir, sentences, max_length=None):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(sentences, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_embeddings_match_transformers(minilm):
    d, _, m = minilm
    ref = _reference(d, SENTENCES)
    got = m.embed(SENTENCES)
    assert got.shape == ref.shape == (len(SENTENCES), 384)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99999, f"cosine similarities {cos}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_pooling_is_stored_and_a_broken_port_fails(minilm):
    from gguf import GGUFReader

    from porter.runtime.core import get_data, set_data

    d, path, m = minilm
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "bert"
    assert r.fields["bert.pooling_type"].contents() == 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN
    assert r.fields["bert.attention.causal"].contents() is False
    assert r.fields["porter.pooling"].contents() == "mean" and r.fields["porter.normalize"].contents() is True
    assert r.fields["tokenizer.ggml.model"].contents() == "bert"
    ref = _reference(d, SENTENCES[:2])
    w = m.weights["blk.2.ffn_up.weight"]
    saved = get_data(w)
    try:
        set_data(w, (saved * 1.1).astype(saved.dtype))
        got = m.embed(SENTENCES[:2])
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() < 0.99999
    finally:
        set_data(w, saved)


def test_the_pooler_is_left_out_on_purpose_not_reported_unused(minilm, tmp_path):
    from porter.pipeline import convert

    d, _, _ = minilm
    report = convert(d, tmp_path / "again.gguf", "f32", progress=False)
    assert report.unused_tensors == [], report.unused_tensors
    assert "unused" not in report.summary()


def test_run_and_chat_refuse_an_encoder_and_point_to_embed(minilm):
    from click.testing import CliRunner

    from porter.cli import main

    _, path, m = minilm
    for command in (["run", str(path), "-p", "hi"], ["chat", str(path)]):
        r = CliRunner().invoke(main, command, input="hi\n")
        assert r.exit_code == 1 and f"this is an encoder (it embeds text, it does not generate): use `porter embed " \
            f"{path} TEXT`" in r.output, r.output
    with pytest.raises(ModelError, match="chat needs a causal LM; this is an encoder: use embed"):
        m.chat([{"role": "user", "content": "hi"}])


def test_embed_warns_past_max_seq_length(minilm):
    """Texts longer than the model's max_seq_length (128, sentence-transformers' cut in its
    tokenizer.json) are embedded from their first 128 tokens, as sentence-transformers does, with
    a warning that says so (before, silently); token ids past the context are refused."""
    from click.testing import CliRunner

    from porter.cli import main

    d, path, m = minilm
    long = "word " * 300
    assert m.max_seq_length == 128
    r = CliRunner().invoke(main, ["embed", str(path), "short", long])
    assert r.exit_code == 0, r.output
    assert "warning: text 1 is 302 tokens long; the model's max_seq_length is 128: only its first 128 tokens are " \
           "embedded" in r.stderr, r.stderr
    assert "text 0" not in r.stderr
    np.testing.assert_allclose(m.embed(long), _reference(d, [long], max_length=128), atol=1e-5)
    assert m.embed([[1000] * 300]).shape == (1, 384)  # ids are the caller's choice
    with pytest.raises(ModelError, match="input 0 has 600 token ids; the model embeds at most 512 \\(its context\\)"):
        m.embed([[1000] * 600])
