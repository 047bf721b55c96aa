"""Tiny random encoders (bert): convert, run and match transformers' final hidden states, and
carry llama.cpp's bert names and keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import porter
from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.pipeline import convert
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint

F32_GATE = 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    ckpt = tiny_checkpoint(architectures()["bert"], d / "ckpt", seed=3, type_vocab_size=2)
    convert(ckpt, d / "m.gguf", "f32", progress=False)
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
    m = porter.load(d / "m.gguf", n_threads=2, n_ctx=64)
    yield d / "m.gguf", hf, m
    m.close()


@pytest.mark.parity
@pytest.mark.parametrize("n", [1, 7, 23])
def test_hidden_states_match(tiny, n):
    _, hf, m = tiny
    ids = np.random.default_rng(n).integers(0, m.n_vocab, n).tolist()
    ref = hf_logits(hf, ids)  # an encoder's final hidden states
    got = m.forward(ids, use_cache=False)
    assert got.shape == ref.shape == (n, hf.config.hidden_size)
    assert nmse(ref, got) <= F32_GATE
    # the same through the KV-cache path
    m.reset()
    assert nmse(ref, m.forward(ids, use_cache=True)) <= F32_GATE
    m.reset()


@pytest.mark.parity
def test_token_types_are_used(tiny):
    _, hf, m = tiny
    ids = np.random.default_rng(0).integers(0, m.n_vocab, 9).tolist()
    types = [0] * 4 + [1] * 5
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), token_type_ids=torch.tensor([types])).last_hidden_state[0].numpy()
    got = m.forward(ids, use_cache=False, token_types=types)
    assert nmse(ref, got) <= F32_GATE
    assert nmse(ref, m.forward(ids, use_cache=False)) > F32_GATE  # the types change the result


def test_gguf_names_and_keys_follow_llama_cpp(tiny):
    from gguf import GGUFReader

    path, hf, _ = tiny
    r = GGUFReader(path)
    c = hf.config
    assert r.fields["general.architecture"].contents() == "bert"
    assert r.fields["bert.attention.causal"].contents() is False
    assert r.fields["bert.block_count"].contents() == c.num_hidden_layers
    assert r.fields["bert.embedding_length"].contents() == c.hidden_size
    assert r.fields["bert.feed_forward_length"].contents() == c.intermediate_size
    assert r.fields["bert.attention.head_count"].contents() == c.num_attention_heads
    assert r.fields["bert.attention.layer_norm_epsilon"].contents() == pytest.approx(c.layer_norm_eps)
    assert r.fields["bert.pooling_type"].contents() == 0  # no sentence-transformers config: none
    names = {t.name: t for t in r.tensors}
    for n in ("token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.weight",
              "token_embd_norm.bias"):
        assert n in names, n
    assert names["token_types.weight"].tensor_type == 0 and names["position_embd.weight"].tensor_type == 0
    for i in range(c.num_hidden_layers):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                  "layer_output_norm"):
            assert f"blk.{i}.{n}.weight" in names and f"blk.{i}.{n}.bias" in names, n
    assert "output.weight" not in names and "output_norm.weight" not in names
