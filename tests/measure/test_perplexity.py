"""porter perplexity: llama-perplexity's chunking, and the same number transformers gives on the same tokens."""

from __future__ import annotations

import re

import numpy as np
import pytest

from porter.errors import OptionError
from porter.measure.perplexity import (chunks_of, perplexity, strided_window, strided_windows,
                                       transformers_perplexity, transformers_strided_perplexity)


def test_chunking_follows_llama_perplexity():
    tokens = list(range(10, 45))  # 35 tokens, -c 8: 4 chunks, 3 tokens dropped
    chunks = chunks_of(tokens, 8, bos_id=1)
    assert [c[0] for c in chunks] == [1, 1, 1, 1]
    assert chunks[1][1:] == tokens[9:16]
    assert len(chunks_of(tokens, 8, n_chunks=2)) == 2
    with pytest.raises(OptionError, match="at least 36"):
        chunks_of(tokens[:30], 18)


def test_strided_windows_follow_llama_perplexity():
    tokens = list(range(100, 135))  # 35 tokens; -c 8 --ppl-stride 4: windows of 10, ceil((35 - 10) / 4) = 7
    windows = strided_windows(tokens, 8, 4)
    assert len(windows) == 7 and all(len(w) == 10 for w in windows)
    assert [w[0] for w in windows] == [100 + 4 * i for i in range(7)]  # no BOS written in, as llama-perplexity
    assert windows[-1] == tokens[24:34]
    # each window scores its last 4 tokens: together a contiguous stretch from token W - S on
    scored = [t for w in windows for t in w[-4:]]
    assert scored == tokens[6:34]
    assert len(strided_windows(tokens, 8, 4, n_chunks=3)) == 3
    assert strided_window(8, 3) == 9 and strided_window(8, 14) == 15  # 14 = 2 * 8 - 2, the largest stride


@pytest.mark.parametrize("stride, n_ctx, message", [
    (-1, 8, "at least 1 token"), (15, 8, "below 15"), (40, 8, "below 15"), (1, 1, "at least 2 tokens")])
def test_bad_strides_are_refused(stride, n_ctx, message):
    with pytest.raises(OptionError, match=message):
        strided_windows(list(range(200)), n_ctx, stride)


def test_strided_needs_two_windows_of_text():
    with pytest.raises(OptionError, match="needs at least 20"):
        strided_windows(list(range(19)), 8, 4)
    assert len(strided_windows(list(range(20)), 8, 4)) == 3


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


def test_tiny_llama_strided_equals_transformers(tiny_pair):
    pair = tiny_pair
    tokens = np.random.default_rng(1).integers(3, 97, size=161).tolist()
    # (-c, stride, batch): an even stride, an odd one in several batches per window, the largest stride
    for n_ctx, stride, n_batch in ((32, 16, 2048), (30, 7, 16), (20, 38, 2048)):
        windows = strided_windows(tokens, n_ctx, stride)
        result = perplexity(pair.porter, tokens, n_ctx, n_batch=n_batch, stride=stride, bos_id=1)
        assert result.n_ctx == n_ctx + stride // 2 and result.stride == stride
        assert result.n_chunks == len(windows) and result.count == len(windows) * stride
        assert len(result.running) == len(windows) and result.running[-1] == result.ppl
        want = transformers_strided_perplexity(pair.hf, windows, stride)
        assert result.ppl == pytest.approx(want, rel=1e-4), (n_ctx, stride, result.ppl, want)
        # the windows overlap: the same tokens in the chunked mode score differently
        assert result.ppl != pytest.approx(perplexity(pair.porter, tokens, n_ctx).ppl, rel=1e-3)
    with pytest.raises(OptionError, match="exceeds the context the model was loaded with"):
        perplexity(pair.porter, list(range(3, 97)) * 6, 120, stride=40)  # window 140 > 128


@pytest.mark.parametrize("stride, message", [("-2", "--ppl-stride -2: give a stride of at least 1"),
                                             ("48", "--ppl-stride 48: each window of -c + stride/2 = 48")])
def test_cli_refuses_bad_strides(tiny_pair, tmp_path, stride, message):
    from click.testing import CliRunner

    from porter.cli import main

    (tmp_path / "t.txt").write_text("some words " * 50)
    out = CliRunner().invoke(main, ["perplexity", str(tiny_pair.gguf), "-f", str(tmp_path / "t.txt"), "-c", "24",
                                    "--ppl-stride", stride])
    assert out.exit_code == 1, out.output
    assert out.output.strip().splitlines() == [out.output.strip().splitlines()[0]]  # one line
    assert out.output.startswith("error: ") and message in out.output, out.output


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

    # the sliding-window mode: -c 96 --ppl-stride 64 runs windows of 128 tokens, 64 apart
    with porter.load(gguf, n_threads=2, n_ctx=128) as m:
        strided = perplexity(m, tokens, 96, n_chunks=3, stride=64)
    want = transformers_strided_perplexity(hf, strided_windows(tokens, 96, 64, 3), 64)
    assert strided.n_ctx == 128 and strided.count == 3 * 64
    assert strided.ppl == pytest.approx(want, rel=1e-4), (strided.ppl, want)
    out = CliRunner().invoke(main, ["perplexity", str(gguf), "-f", str(tmp_path / "t.txt"), "-c", "96",
                                    "--ppl-stride", "64", "--chunks", "3", "-t", "2"])
    assert out.exit_code == 0, out.output
    assert "windows, n_ctx=128 (-c 96 + stride/2), stride=64" in out.stderr
    running = re.search(r"^\[1\]([\d.]+),\[2\][\d.]+,\[3\][\d.]+,$", out.stdout, re.M)
    assert running and float(running.group(1)) == pytest.approx(strided.running[0], abs=1e-4), out.stdout
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout)
    assert final and float(final.group(1)) == pytest.approx(strided.ppl, abs=1e-4)


def test_cli_refuses_a_missing_text(tiny_pair):
    from click.testing import CliRunner

    from porter.cli import main

    pair = tiny_pair
    out = CliRunner().invoke(main, ["perplexity", str(pair.gguf)])
    assert out.exit_code == 1 and "give the text to score" in out.output
