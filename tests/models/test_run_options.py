"""`porter run` refuses options outside their range with the valid range, before any compute."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from porter.cli import main
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint
from tests.convert.test_tokenizer import sentencepiece_style


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q2")
    ckpt = tiny_checkpoint(architectures()["qwen2"], folder / "ckpt")
    sentencepiece_style(folder, chat_template="{{ messages[0]['content'] }}")
    for f in (folder / "spm").iterdir():
        f.rename(ckpt / f.name)
    out = folder / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def run(gguf, *args):
    return CliRunner().invoke(main, ["run", str(gguf), "-n", "2", *args])


REFUSED = {
    "empty prompt": (["-p", "", "--no-chat"], "the prompt is empty"),
    "non-UTF-8 prompt": (["-p", "caf\udce9", "--no-chat"], "not valid UTF-8"),
    "prompt longer than the context": (["-p", "word " * 40, "--no-chat", "-c", "8"], "the context holds 8"),
    "-c 1": (["-c", "1"], "-c 1: the context must hold at least 2 tokens"),
    "-c -1": (["-c", "-1"], "-c -1: the context must hold at least 2 tokens"),
    "-c 10**12": (["-c", str(10**12)], "the KV cache needs"),
    "-t -1": (["-t", "-1"], "-t -1: give at least 1 thread"),
    "--seed -1": (["--seed", "-1"], "--seed -1: give a seed in 0..2**64-1"),
    "--temp nan": (["--temp", "nan"], "--temp nan: the temperature must be a finite number >= 0"),
    "--temp -1": (["--temp", "-1"], "--temp -1.0: the temperature must be a finite number >= 0"),
    "--top-p 5": (["--top-p", "5"], "--top-p 5.0: the nucleus probability must be in (0, 1]"),
    "--top-p 0": (["--top-p", "0"], "--top-p 0.0: the nucleus probability must be in (0, 1]"),
    "--top-p nan": (["--top-p", "nan"], "--top-p nan: the nucleus probability must be in (0, 1]"),
    "--top-k -3": (["--top-k", "-3"], "--top-k -3: give a number of candidates >= 0"),
    "-n -5": (["-n", "-5"], "-n -5: give a number of tokens >= 0, or -1"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_the_valid_range(case, gguf):
    args, message = REFUSED[case]
    r = run(gguf, *args)
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert "error: " in r.output and message in r.output, r.output
    assert "Traceback" not in r.output


def test_threads_are_capped_at_the_cores(gguf):
    import os

    cores = len(os.sched_getaffinity(0))
    r = run(gguf, "-t", "1000", "-p", "hi", "--no-chat")
    assert r.exit_code == 0, r.output
    assert f"-t 1000 exceeds the {cores} cores available; using {cores}" in r.output
    assert f"of {cores} threads" in r.output


def test_n_minus_one_runs_until_the_context_is_full(gguf):
    r = run(gguf, "-p", "hi", "--no-chat", "-c", "12", "-n", "-1", "--temp", "0")
    assert r.exit_code == 0, r.output
    n_prompt = int(r.output.split("prompt: ")[1].split(" tokens")[0])
    generated = int(r.output.split("generation: ")[1].split(" tokens")[0])
    assert 1 <= generated <= 12 - n_prompt, r.output  # stops at end of sequence or a full context
