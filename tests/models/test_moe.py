"""Tiny random mixture-of-experts models (mixtral, qwen3_moe): convert, run, match transformers,
and carry llama.cpp's names and keys."""

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
from porter.testing.parity import stepped_logits

F32_GATE = 1e-6
N_EXPERT = 4
CASES = {
    "mixtral": ({"num_local_experts": N_EXPERT, "num_experts_per_tok": 2, "sliding_window": 6}, "llama"),
    "qwen3_moe": ({"num_experts": N_EXPERT, "num_experts_per_tok": 2, "norm_topk_prob": False}, "qwen3moe"),
    "qwen3_moe-norm": ({"num_experts": N_EXPERT, "num_experts_per_tok": 2, "norm_topk_prob": True}, "qwen3moe"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
    case = request.param
    model_type = case.split("-")[0]
    overrides, gguf_arch = CASES[case]
    d = tmp_path_factory.mktemp(model_type)
    ckpt = tiny_checkpoint(architectures()[model_type], d / "ckpt", seed=2, **overrides)
    convert(ckpt, d / "m.gguf", "f32", progress=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    m = porter.load(d / "m.gguf", n_threads=2, n_ctx=64)
    yield case, gguf_arch, d / "m.gguf", hf, m
    m.close()


@pytest.mark.parity
def test_prefill_then_decode_matches(tiny):
    """Whole-sequence logits, then prefill 9 tokens and decode 6 more through the KV cache."""
    case, _, _, hf, m = tiny
    ids = np.random.default_rng(1).integers(0, m.n_vocab, 15).tolist()
    ref = hf_logits(hf, ids)
    err = nmse(ref, m.logits(ids))
    assert err <= F32_GATE, f"{case}: prefill logits NMSE {err:.3e}"
    got = stepped_logits(m, ids, 9)
    err = nmse(ref, got)
    assert err <= F32_GATE, f"{case}: cached decode NMSE {err:.3e}"
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_gguf_names_and_keys_follow_llama_cpp(tiny):
    from gguf import GGUFReader

    case, arch, path, hf, m = tiny
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.expert_count"].contents() == N_EXPERT
    assert r.fields[f"{arch}.expert_used_count"].contents() == 2
    if arch == "qwen3moe":
        assert r.fields[f"{arch}.expert_feed_forward_length"].contents() == hf.config.moe_intermediate_size
    tensors = {t.name: t for t in r.tensors}
    n_embd, n_ff = hf.config.hidden_size, (hf.config.moe_intermediate_size if arch == "qwen3moe"
                                           else hf.config.intermediate_size)
    for i in range(hf.config.num_hidden_layers):
        # ggml order (ne): [n_embd, n_ff, n_expert] for gate/up, [n_ff, n_embd, n_expert] for down
        assert list(tensors[f"blk.{i}.ffn_gate_exps.weight"].shape) == [n_embd, n_ff, N_EXPERT]
        assert list(tensors[f"blk.{i}.ffn_up_exps.weight"].shape) == [n_embd, n_ff, N_EXPERT]
        assert list(tensors[f"blk.{i}.ffn_down_exps.weight"].shape) == [n_ff, n_embd, N_EXPERT]
        assert list(tensors[f"blk.{i}.ffn_gate_inp.weight"].shape) == [n_embd, N_EXPERT]
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
            assert f"blk.{i}.{name}.weight" in tensors
        assert f"blk.{i}.ffn_gate.weight" not in tensors
        if arch == "qwen3moe":
            assert f"blk.{i}.attn_q_norm.weight" in tensors and f"blk.{i}.attn_k_norm.weight" in tensors


def test_broken_routing_is_detected(tiny):
    """The comparison can fail: perturb the router of layer 0 and the logits must move."""
    case, _, _, hf, m = tiny
    ids = list(range(1, 12))
    ref = hf_logits(hf, ids)
    from porter.runtime.core import get_data, set_data

    w = m.weights["blk.0.ffn_gate_inp.weight"]
    saved = get_data(w)
    try:
        set_data(w, (-saved).astype(saved.dtype))
        assert nmse(ref, m.logits(ids)) > F32_GATE
    finally:
        set_data(w, saved)
