"""porter perplexity: llama-perplexity's chunking, and the same number transformers gives on the same tokens."""

from __future__ import annotations

import re

import numpy as np
import pytest

from porter.errors import OptionError
from porter.measure.perplexity import chunks_of, perplexity, transformers_perplexity


def test_chunking_follows_llama_perplexity():
    tokens = list(range(10, 45))  # 35 tokens, -c 8: 4 chunks, 3 tokens dropped
    chunks = chunks_of(tokens, 8, bos_id=1)
    assert [c[0] for c in chunks] == [1, 1, 1, 1]
    assert chunks[1][1:] == tokens[9:16]
    assert len(chunks_of(tokens, 8, n_chunks=2)) == 2
    with pytest.raises(OptionError, match="at least 36"):
        chunks_of(tokens[:30], 18)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from porter.testing.parity import port_tiny

    # closed at the end of the module: tests/runtime/test_lifetimes.py counts live ggml objects
    with port_tiny("llama", directory=tmp_path_factory.mktemp("ppl")) as pair:
        yield pair


def test_tiny_llama_equals_transformers(tiny_pair):
    pair = tiny_pair
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 97, size=3 * 40 + 7).tolist()
    for bos, n_batch in ((None, 2048), (1, 16)):  # one pass per chunk; several batches through the cache
        result = perplexity(pair.porter, tokens, 40, n_batch=n_batch, bos_id=bos)
        assert result.n_chunks == 3 and result.count == 3 * 19
        assert len(result.running) == 3 and result.running[-1] == result.ppl
        want = transformers_perplexity(pair.hf, chunks_of(tokens, 40, bos_id=bos))
        assert result.ppl == pytest.approx(want, rel=1e-4), (result.ppl, want)
        assert 0 < result.ppl_error < result.ppl


@pytest.mark.realmodel
@pytest.mark.parity
def test_smollm2_f32_equals_transformers_and_cli_prints_llama_format(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    import porter
    from porter.cli import main
    from porter.examples import materialize_smollm2
    from porter.measure.perplexity import bos_for
    from porter.measure.text import python_reference
    from porter.pipeline import convert

    smollm2_dir = materialize_smollm2(progress=False)
    gguf = tmp_path / "smollm2.f32.gguf"
    convert(smollm2_dir, gguf, "f32", progress=False)
    text = python_reference(6000)
    with porter.load(gguf, n_threads=2, n_ctx=128) as m:
        tokens = m.encode(text)
        bos = bos_for(m)
        result = perplexity(m, tokens, 128, n_chunks=3, bos_id=bos)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    want = transformers_perplexity(hf, chunks_of(tokens, 128, 3, bos))
    assert result.ppl == pytest.approx(want, rel=1e-4), (result.ppl, want)

    (tmp_path / "t.txt").write_text(text)
    out = CliRunner().invoke(main, ["perplexity", str(gguf), "-f", str(tmp_path / "t.txt"), "-c", "128",
                                    "--chunks", "3", "-t", "2"])
    assert out.exit_code == 0, out.output
    assert re.search(r"^\[1\][\d.]+,\[2\][\d.]+,\[3\][\d.]+,$", out.stdout, re.M), out.stdout
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout)
    assert final and float(final.group(1)) == pytest.approx(result.ppl, abs=1e-4)


def test_cli_refuses_a_missing_text(tiny_pair):
    from click.testing import CliRunner

    from porter.cli import main

    pair = tiny_pair
    out = CliRunner().invoke(main, ["perplexity", str(pair.gguf)])
    assert out.exit_code == 1 and "give the text to score" in out.output
