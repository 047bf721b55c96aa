"""Chat on SmolLM2-135M-Instruct (real weights) against transformers at run time.

The checkpoint is a copy whose eos_token (<|endoftext|>) is not the end-of-turn token
(<|im_end|>) and whose generation_config lists both, the Llama 3 / Gemma pattern: porter used to
keep only the first id and chat past the end of the turn.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import porter

pytestmark = [pytest.mark.realmodel, pytest.mark.parity]

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from porter.examples import materialize_smollm2
    from porter.pipeline import convert

    src = materialize_smollm2(progress=False)
    d = tmp_path_factory.mktemp("smollm2-eot")
    ckpt = d / "ckpt"
    ckpt.mkdir()
    edits = {"config.json": {"eos_token_id": 0}, "tokenizer_config.json": {"eos_token": "<|endoftext|>"},
             "generation_config.json": {"eos_token_id": [0, 2]}}
    for f in src.iterdir():
        if f.name in edits:
            (ckpt / f.name).write_text(json.dumps({**json.loads(f.read_text()), **edits[f.name]}))
        elif not f.name.startswith("."):
            os.symlink(f, ckpt / f.name)
    gguf = d / "m.f32.gguf"
    convert(ckpt, gguf, "f32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    with porter.load(gguf, n_threads=2, n_ctx=512) as m:
        yield m, hf, tok, gguf


def hf_answer(hf, tok, messages, max_new_tokens=64, **kwargs) -> tuple[str, list[int]]:
    """transformers' greedy answer (its generation_config: both end ids) as the prompt text and
    the generated ids."""
    import torch

    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return text, out[0, len(ids):].tolist()


def test_stops_at_the_end_of_turn_where_transformers_stops(chat_model):
    m, hf, tok, _ = chat_model
    assert m.metadata["eos_token_id"] == 0 and m.metadata["eot_token_id"] == 2
    assert m.metadata["eog_token_ids"] == [0, 2]
    text, theirs = hf_answer(hf, tok, QUESTION)
    assert theirs[-1] == 2 and len(theirs) < 64  # transformers stops at <|im_end|>
    assert m.apply_chat_template(QUESTION) == text
    r = m.chat(QUESTION, max_new_tokens=64)
    assert r.tokens == theirs
    assert r.finish_reason == "stop" and r.completion_tokens == len(theirs)
    assert r == tok.decode(theirs, skip_special_tokens=True)
    _, stats = m.generate(m.encode(text, add_special_tokens=False), 64)  # porter run's path
    assert stats.tokens == theirs


def test_stop_strings_cut_where_transformers_stops(chat_model):
    m, hf, tok, _ = chat_model
    _, theirs = hf_answer(hf, tok, QUESTION, stop_strings=["Paris"], tokenizer=tok)
    full = tok.decode(theirs, skip_special_tokens=True)
    assert full.endswith("Paris") or "Paris" in full
    r = m.chat(QUESTION, max_new_tokens=64, stop=["Paris"])
    assert r == full[:full.index("Paris")] and r.finish_reason == "stop"
    assert r.tokens == theirs  # transformers also stops on the token that completes the string
    short = m.chat(QUESTION, max_new_tokens=3)
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_the_next_turn_evaluates_only_its_new_tokens(chat_model):
    m, hf, tok, _ = chat_model
    first = m.chat(QUESTION)
    turn2 = QUESTION + [{"role": "assistant", "content": str(first)},
                        {"role": "user", "content": "And the capital of Italy?"}]
    before = m.tokens_evaluated
    second = m.chat(turn2)
    # the cache held the first prompt and answer (its final <|im_end|> not yet evaluated)
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens - 1
    new = second.prompt_tokens - second.cached_tokens
    assert new < 20  # <|im_end|>, the new user turn and the assistant header
    assert m.tokens_evaluated - before == new + second.completion_tokens - 1
    assert second.tokens == hf_answer(hf, tok, turn2)[1]  # the same answer as a fresh prompt in transformers


def test_stream_yields_whole_characters(chat_model):
    m, _, _, _ = chat_model
    stream = m.chat([{"role": "user", "content": "Say 'thank you' in Japanese."}], stream=True, max_new_tokens=24)
    pieces = list(stream)
    r = stream.reply
    assert any(m.tokenizer.decode([t]) == "\ufffd" for t in r.tokens)  # some tokens are parts of a character
    assert not any("\ufffd" in p for p in pieces)
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", r)
    # the whole text, without the part of a character the length limit cut
    assert "".join(pieces) == r == m.tokenizer.decode(r.tokens).rstrip("\ufffd")
    assert stream.finish_reason == r.finish_reason


def test_porter_chat_two_turns_through_a_pipe(chat_model):
    m, _, _, gguf = chat_model
    turns = ["What is the capital of France? Answer in one sentence.", "And the capital of Italy?"]
    messages, expected = [], []
    for t in turns:
        messages.append({"role": "user", "content": t})
        r = m.chat(messages)
        expected.append(r)
        messages.append({"role": "assistant", "content": str(r)})
    p = subprocess.run([sys.executable, "-m", "porter", "chat", str(gguf), "-t", "2", "-c", "512"],
                       input="\n".join(turns + ["/exit", "never read"]).encode(), capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert p.stdout.decode().splitlines() == [str(r) for r in expected]
    stats = re.findall(r"prompt: (\d+) new tokens, (\d+) cached", err)
    assert len(stats) == 2
    assert int(stats[1][1]) == expected[0].prompt_tokens + expected[0].completion_tokens - 1
    assert int(stats[1][0]) == expected[1].prompt_tokens - int(stats[1][1])
