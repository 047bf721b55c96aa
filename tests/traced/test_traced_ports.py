"""The traced path (torch.export) on tiny random models, compared with transformers at run time.

- every declared plugin's causal model type, ported with the traced path instead of its plugin:
  logits match transformers and the plugin's own declared port of the same checkpoint;
- the model types the auto-port issue names: ported with no plugin, KV cache included.

Each case builds a tiny random checkpoint, traces it, writes a GGUF and compares prefill logits
(all positions) and prefill-then-decode logits with transformers' (F32 gate: NMSE <= 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.plugins import architectures
from porter.testing.parity import PortedPair, port_tiny_traced, stepped_logits

pytestmark = pytest.mark.parity
GATE = 1e-6
DECLARED_CAUSAL = sorted(t for t, cls in architectures().items() if cls.causal)
# named by the auto-port issue: must port through the traced path (arcee and olmo have plugins now:
# they are traced here all the same, and also cross-checked above)
NAMED = ["afmoe", "apertus", "arcee", "bitnet", "ernie4_5", "exaone4", "exaone_moe", "glm4", "granite_swa",
         "helium", "hunyuan_v1_dense", "hyperclovax", "mellum", "minicpm3", "nemotron", "olmo", "olmo3",
         "seed_oss"]


def _ids(vocab: int, n: int = 24, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, n)]


def _check_against_transformers(pair, context: str) -> np.ndarray:
    ids = _ids(pair.porter.n_vocab)
    ref = hf_logits(pair.hf, ids)
    got = pair.porter.logits(ids)
    e = nmse(ref, got)
    assert e <= GATE, f"{context}: traced logits NMSE {e:.3e} against transformers"
    cached = stepped_logits(pair.porter, ids, 9)
    ec = nmse(ref, cached)
    assert ec <= GATE, f"{context}: traced prefill 9 + decode NMSE {ec:.3e} against transformers"
    assert "traced" in pair.porter.spec.produced_by
    return got


@pytest.mark.parametrize("model_type", DECLARED_CAUSAL)
def test_declared_type_through_the_traced_path(model_type, tmp_path):
    with port_tiny_traced(model_type, directory=tmp_path / "traced") as pair:
        traced = _check_against_transformers(pair, f"{model_type} --traced")
        from porter.pipeline import convert

        declared_gguf = tmp_path / "declared.gguf"
        convert(pair.checkpoint, declared_gguf, "f32", progress=False)
        with PortedPair(pair.checkpoint, declared_gguf, "f32") as declared:
            assert "traced" not in declared.porter.spec.produced_by
            other = declared.porter.logits(_ids(pair.porter.n_vocab))
        e = nmse(other, traced)
        assert e <= GATE, f"{model_type}: traced and declared ports differ by NMSE {e:.3e}"


@pytest.mark.parametrize("model_type", NAMED)
def test_named_type_ports_through_the_traced_path(model_type, tmp_path):
    with port_tiny_traced(model_type, directory=tmp_path) as pair:
        _check_against_transformers(pair, model_type)
        spec = pair.porter.spec
        # the layers are one loop, not written out one by one
        assert spec.layer_loop is not None, f"{model_type}: layers were unrolled"


# types that are the only ones (or among few) to exercise a lowering rewrite: type -> what
# and the spec ops (or runtime input kinds) the rewrite must produce
REWRITES = {
    "deepseek_v2": ("rotary embedding written with complex numbers (view_as_complex * freqs_cis)", {"rope"}),
    "llama4_text": ("complex rotary; router scores scattered back at their top-k indices", {"rope", "top_k"}),
    "gpt_neox_japanese": ("eager attention scores as baddbmm into a zeros tensor, then the mask", {"kv_store"}),
    "bloom": ("ALiBi slopes * key positions as the baddbmm input of the scores", {"kv_store", "kq_mask_alibi"}),
    "mpt": ("ALiBi bias of max_seq_len keys, sliced to the keys and added to the scores",
            {"kv_store", "kq_mask_alibi"}),
    "phimoe": ("sparsemixer routing: -inf scattered at each row's maximum, clamp to tensor bounds",
               {"mul_mat_id", "argmax"}),
    "lfm2_moe": ("short convolution layers beside attention", {"state_store", "ssm_conv"}),
    "lfm3": ("short causal depthwise convolution (conv1d) beside attention layers", {"state_store", "ssm_conv"}),
    "qwen3_next": ("gated delta rule kernel (two key heads over four value heads) after a short convolution",
                   {"delta_net", "state_store", "ssm_conv"}),
    "kimi_linear": ("Kimi delta attention: the delta rule with a decay per key channel", {"delta_net"}),
    "mamba2": ("Mamba-2's chunked scan kernel: a decay per head, groups of heads sharing B and C",
               {"ssm_scan", "state_store", "ssm_conv"}),
    "mamba": ("Mamba's selective scan kernel: a decay per state entry, D x and the silu gate", {"ssm_scan"}),
}


def _spec_ops(items) -> set[str]:
    ops = set()
    for item in items:
        body = getattr(item, "body", None)
        ops |= _spec_ops(body) if body is not None else {item.op}
    return ops


@pytest.mark.parametrize("model_type", sorted(REWRITES))
def test_rewrite_type_ports_through_the_traced_path(model_type, tmp_path):
    what, ops = REWRITES[model_type]
    with port_tiny_traced(model_type, directory=tmp_path) as pair:
        _check_against_transformers(pair, f"{model_type} ({what})")
        spec = pair.porter.spec
        missing = ops - _spec_ops(spec.graph) - {i.kind for i in spec.inputs}
        assert not missing, f"{model_type}: the spec has no {sorted(missing)} node or input ({what} lowered literally?)"


@pytest.mark.parametrize("model_type", ["lfm3", "qwen3_next", "mamba2"])
def test_recurrent_state_starts_over_with_each_sequence(model_type, tmp_path):
    """A convolution's state (the last steps), a delta rule's memory and a scan's state are not
    rows per position: a new sequence (reset) must not see the previous one's, and decoding continues it
    exactly."""
    with port_tiny_traced(model_type, directory=tmp_path) as pair:
        m = pair.porter
        ids, other = _ids(m.n_vocab), _ids(m.n_vocab, seed=1)
        first = stepped_logits(m, ids, 5)
        m.forward(other[:7])  # another sequence's steps in the state
        m.reset()
        again = stepped_logits(m, ids, 5)
        assert np.array_equal(first, again), "the state of an earlier sequence leaked into a new one"
        e = nmse(hf_logits(pair.hf, ids), first)
        assert e <= GATE, f"{model_type}: prefill 5 + decode NMSE {e:.3e} against transformers"


def test_a_time_step_limit_that_binds(tmp_path):
    """Mamba-2's dt limit clamps softplus(dt); ggml applies the softplus itself, so porter clamps dt
    at the limits' preimages. With limits that bind on both sides, the port still matches, and
    transformers' own logits move (the limit is not a no-op here)."""
    limit = {"time_step_limit": (0.02, 0.05)}
    with port_tiny_traced("mamba2", overrides=limit, directory=tmp_path / "limited") as pair:
        _check_against_transformers(pair, "mamba2 with a binding time-step limit")
        assert "clamp" in _spec_ops(pair.porter.spec.graph)
        ids = _ids(pair.porter.n_vocab)
        limited = hf_logits(pair.hf, ids)
        pair.hf.config.time_step_limit = (0.0, float("inf"))
        for layer in pair.hf.backbone.layers:
            layer.mixer.time_step_limit = (0.0, float("inf"))
        assert nmse(limited, hf_logits(pair.hf, ids)) > 1e-4, "the limit did not change transformers' logits"


def test_an_index_computed_from_the_token_ids(tmp_path):
    """Gemma 3n reads its per-layer embedding table at ``where(0 <= id < rows, id, 0)``: an
    element-wise function of the ids, tabulated over the vocabulary at trace time. With a table
    shorter than the vocabulary, ids beyond it (in the prompt here) read row 0 in porter too."""
    with port_tiny_traced("gemma3n_text", overrides={"vocab_size_per_layer_input": 200},
                          directory=tmp_path) as pair:
        ids = _ids(pair.porter.n_vocab)
        assert max(ids) >= 200, "the prompt never leaves the per-layer table"
        _check_against_transformers(pair, "gemma3n_text with a short per-layer table")
        assert any("token_map" in n.name for n in pair.porter.spec.graph)
