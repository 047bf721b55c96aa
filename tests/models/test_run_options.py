"""`porter run` refuses options outside their range with the valid range, before any compute.

Each case runs ``python -m porter run`` in its own process, as a user would: the exit status,
the message, the absence of a traceback and of any file left behind are checked there (argv
bytes that are not UTF-8 only exist that way).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
from click.testing import CliRunner

from porter.cli import main
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint
from tests.convert.test_tokenizer import sentencepiece_style


def tiny_qwen2_gguf(folder, **template):
    """A tiny qwen2 with a sentencepiece-style tokenizer and the chat template given, converted."""
    ckpt = tiny_checkpoint(architectures()["qwen2"], folder / "ckpt")
    sentencepiece_style(folder, **template)
    for f in (folder / "spm").iterdir():
        f.rename(ckpt / f.name)
    out = folder / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_qwen2_gguf(tmp_path_factory.mktemp("q2"), chat_template="{{ messages[0]['content'] }}")


def porter_run(model, *args, tmp_path, limit_memory: int | None = None) -> tuple[int, str, str]:
    """Run ``python -m porter run MODEL -n 2 ARGS`` in ``tmp_path``; (exit status, stdout, stderr),
    after checking that no traceback was printed and no file was written."""
    before = sorted(os.listdir(tmp_path))
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))) if limit_memory else None
    r = subprocess.run([sys.executable, "-m", "porter", "run", str(model), "-n", "2", *args], cwd=tmp_path,
                       capture_output=True, timeout=300, preexec_fn=limit)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before
    return r.returncode, out, err


# options checked before the model is read: refused even when MODEL does not exist
BEFORE_LOADING = {
    "empty prompt": (["-p", "", "--no-chat"], "the prompt is empty"),
    "non-UTF-8 prompt": (["-p", b"\xff\xfe", "--no-chat"], "the prompt is not valid UTF-8 text (byte 0xff at character 0)"),
    "-c 1": (["-c", "1"], "-c 1: the context must hold at least 2 tokens"),
    "-c -1": (["-c", "-1"], "-c -1: the context must hold at least 2 tokens"),
    "-t -1": (["-t", "-1"], "-t -1: give at least 1 thread"),
    "-t 0": (["-t", "0"], "-t 0: give at least 1 thread"),
    "--seed -2": (["--seed", "-2"], "--seed -2: give a seed in 0..2**64-1, or -1 for a random one"),
    "--seed 2**64": (["--seed", str(2**64)], "give a seed in 0..2**64-1"),
    "--temp nan": (["--temp", "nan"], "--temp nan: the temperature must be a finite number >= 0"),
    "--temp -1": (["--temp", "-1"], "--temp -1.0: the temperature must be a finite number >= 0"),
    "--top-p 5": (["--top-p", "5"], "--top-p 5.0: the nucleus probability must be in (0, 1]"),
    "--top-p 0": (["--top-p", "0"], "--top-p 0.0: the nucleus probability must be in (0, 1]"),
    "--top-p nan": (["--top-p", "nan"], "--top-p nan: the nucleus probability must be in (0, 1]"),
    "--top-k -3": (["--top-k", "-3"], "--top-k -3: give a number of candidates >= 0"),
    "-n -5": (["-n", "-5"], "-n -5: give a number of tokens >= 0, or -1"),
}


@pytest.mark.parametrize("case", BEFORE_LOADING)
def test_refused_with_the_valid_range_before_loading(case, tmp_path):
    args, message = BEFORE_LOADING[case]
    status, _, err = porter_run(tmp_path / "absent.gguf", *args, tmp_path=tmp_path)
    assert status == 1, err
    assert err.startswith("error: ") and message in err, err
    assert "no such GGUF file" not in err  # refused before the model was looked at


@pytest.mark.parametrize("case", ["empty prompt", "non-UTF-8 prompt", "-c 1", "--top-p nan", "-n -5"])
def test_refused_with_a_model_too(case, gguf, tmp_path):
    args, message = BEFORE_LOADING[case]
    status, _, err = porter_run(gguf, *args, tmp_path=tmp_path)
    assert status == 1 and message in err, err


def test_prompt_longer_than_the_context(gguf, tmp_path):
    status, _, err = porter_run(gguf, "-p", "word " * 40, "--no-chat", "-c", "8", tmp_path=tmp_path)
    assert status == 1, err
    assert "tokens, the context holds 8 (and needs room for at least one new token); shorten the prompt or " \
           "raise -c (this model has 256 positions)" in err, err


def test_prompt_longer_than_the_context_is_refused_before_any_compute(gguf, monkeypatch):
    from porter.runtime.model import Model

    def forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the prompt length was checked")

    monkeypatch.setattr(Model, "forward", forward)
    r = CliRunner().invoke(main, ["run", str(gguf), "-p", "word " * 40, "--no-chat", "-c", "8"])
    assert r.exit_code == 1 and "the context holds 8" in r.output, (r.output, r.exception)


def test_kv_cache_beyond_available_memory(gguf, tmp_path):
    status, _, err = porter_run(gguf, "-c", str(10**12), tmp_path=tmp_path)
    assert status == 1, err
    assert "the KV cache of 1000000000000 positions needs 476837.2 GiB" in err, err
    assert "lower the context (porter run -c" in err, err


def test_kv_cache_that_cannot_be_allocated(gguf, tmp_path):
    """Within the machine's free memory but beyond the process's limit: the allocation fails,
    and the error still names the KV cache and its size (it blamed the weight buffer once)."""
    from porter.runtime.core import available_memory

    status, _, err = porter_run(gguf, "-c", str(10**7), "-p", "hi", "--no-chat", tmp_path=tmp_path,
                                limit_memory=2 << 30)
    assert status == 1, err
    assert "the KV cache of 10000000 positions needs 4.8 GiB" in err and "lower the context (porter run -c" in err, err
    if (available_memory() or 0) > 5 << 30:  # else refused before allocating, as above
        assert "could not be allocated" in err, err


def test_threads_are_capped_at_the_cores(gguf, tmp_path):
    cores = len(os.sched_getaffinity(0))
    status, _, err = porter_run(gguf, "-t", "1000", "-p", "hi", "--no-chat", tmp_path=tmp_path)
    assert status == 0, err
    assert f"warning: -t 1000 exceeds the {cores} cores available; using {cores}\n" in err, err
    assert f"of {cores} threads" in err


def test_n_minus_one_runs_until_the_context_is_full(gguf, tmp_path):
    status, _, err = porter_run(gguf, "-p", "hi", "--no-chat", "-c", "12", "-n", "-1", tmp_path=tmp_path)
    assert status == 0, err
    n_prompt = int(err.split("prompt: ")[1].split(" tokens")[0])
    generated = int(err.split("generation: ")[1].split(" tokens")[0])
    assert 1 <= generated <= 12 - n_prompt, err  # stops at end of sequence or a full context


def test_llama_cpp_meanings(gguf, tmp_path):
    """--seed -1 is a random seed, --top-k 0 keeps every candidate, -c 0 is the model's context."""
    status, _, err = porter_run(gguf, "-p", "hi", "--no-chat", "--seed", "-1", "--temp", "1", "--top-k", "0",
                                "-c", "0", tmp_path=tmp_path)
    assert status == 0, err
    assert "context 256" in err, err  # the tiny checkpoint's max_position_embeddings


def test_help_states_the_ranges():
    r = CliRunner().invoke(main, ["run", "--help"], terminal_width=400)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for meaning in ("-1: until the end of the sequence or a full context", "0 = greedy", "0 = all candidates",
                    "1 = off", "-1 or none: a random seed", "0: the model's", "capped at the cores available"):
        assert meaning in text, meaning


def test_embed_threads_refused_or_capped(gguf):
    """``porter embed -t``: the same range as ``porter run`` (refused below 1, before loading;
    capped at the cores available, with a warning)."""
    r = CliRunner().invoke(main, ["embed", str(gguf), "hello", "-t", "0"])
    assert r.exit_code != 0 and "-t 0: give at least 1 thread" in r.output, r.output
    cores = len(os.sched_getaffinity(0))
    r = CliRunner().invoke(main, ["embed", str(gguf), "hello", "-t", str(cores + 7)])
    assert f"exceeds the {cores} cores available; using {cores}" in r.output, r.output


def test_prompt_from_a_file_or_standard_input(gguf, tmp_path):
    """-f FILE and -f - give the same generation as the same text passed with -p."""
    text = "hé b ab\nc"
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    status, expected, err = porter_run(gguf, "-p", text, "--no-chat", tmp_path=tmp_path)
    assert status == 0, err
    status, out, err = porter_run(gguf, "-f", "prompt.txt", "--no-chat", tmp_path=tmp_path)
    assert status == 0 and out == expected, err
    r = subprocess.run([sys.executable, "-m", "porter", "run", str(gguf), "-n", "2", "-f", "-", "--no-chat"],
                       input=text.encode(), capture_output=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode() == expected, r.stderr.decode()


@pytest.mark.parametrize("case", ["missing", "not UTF-8"])
def test_a_bad_prompt_file_is_refused(gguf, tmp_path, case):
    if case == "not UTF-8":
        (tmp_path / "p.txt").write_bytes(b"ok \xff\xfe")
        message = "-f p.txt: the prompt is not valid UTF-8 text (byte 0xff at byte 3); give UTF-8 text"
    else:
        message = "-f p.txt: cannot read the prompt file (No such file or directory)"
    status, _, err = porter_run(gguf, "-f", "p.txt", tmp_path=tmp_path)
    assert status == 1 and message in err, err


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    return tiny_qwen2_gguf(tmp_path_factory.mktemp("q2chat"),
                           chat_template__jinja="{% for m in messages %}{{ m.role }}: {{ m.content }} {% endfor %}")


def test_porter_chat_ends_cleanly_on_ctrl_c(chat_gguf, tmp_path):
    """After an answer, Ctrl-C (SIGINT) while porter chat waits for the next line ends it with
    status 0 and no traceback; so does the end of input (empty lines are skipped)."""
    import signal
    import time

    gguf = chat_gguf
    p = subprocess.Popen([sys.executable, "-m", "porter", "chat", str(gguf), "-n", "3"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    p.stdin.write(b"b ab\n")
    p.stdin.flush()
    err = b""
    deadline = time.monotonic() + 120
    while b"answer:" not in err and time.monotonic() < deadline and p.poll() is None:  # the first turn's counts
        err += p.stderr.read1(4096)
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=60)
    err = (err + rest).decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "answer: 3 tokens" in err and out.decode().count("\n") == 1
    r = subprocess.run([sys.executable, "-m", "porter", "chat", str(gguf), "-n", "2"], input=b"b ab\n\nc\n",
                       capture_output=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.decode().count("answer: 2 tokens") == 2, r.stderr.decode()
