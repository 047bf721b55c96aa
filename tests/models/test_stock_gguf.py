"""GGUFs without a porter graph spec (as llama.cpp's converter writes them): the plugin of the
file's architecture rebuilds the spec from llama.cpp's keys (porter.runtime.stock)."""

from __future__ import annotations

import numpy as np
import pytest

from porter.errors import ModelError
from porter.pipeline import convert
from porter.plugins import architectures
from porter.runtime.model import Model
from porter.testing.gguf_edit import load_in_child, strip_keys
from porter.testing.models import tiny_checkpoint

CAUSAL = sorted(t for t, c in architectures().items() if c.causal)
# their graphs depend on a config field no llama.cpp key carries (query_pre_attn_scalar)
NOT_REBUILDABLE = {"gemma2": "query_pre_attn_scalar", "gemma3_text": "query_pre_attn_scalar"}
# configurations beyond each type's tiny default: (model_type, overrides, None if it rebuilds,
# else what the refusal names)
VARIANTS = [
    ("mistral", {"sliding_window": 5}, None),
    ("llama", {"attention_bias": True, "mlp_bias": True,
               "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32}}, None),
    ("falcon", {"new_decoder_architecture": False, "parallel_attn": False}, None),
    ("stablelm", {"use_parallel_residual": True, "partial_rotary_factor": 0.25}, None),
    ("falcon", {"alibi": True}, "falcon.rope.dimension_count"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}}, None),
    ("stablelm", {"qk_layernorm": True}, "blk.0.attn_q_norm.weight"),
    ("phi3", {"longrope": True}, "rope_factors_long.weight"),
]


def _stripped_pair(model_type, overrides, tmp_path):
    cls = architectures()[model_type]
    gguf = tmp_path / "model.gguf"
    convert(tiny_checkpoint(cls, tmp_path / "ckpt", seed=1, **overrides), gguf, "f32", progress=False, arch_cls=cls)
    stripped = tmp_path / "stripped.gguf"
    assert strip_keys(gguf, stripped, ["porter.graph_spec"]) == ["porter.graph_spec"]
    return gguf, stripped


def _check(model_type, overrides, refusal, tmp_path):
    gguf, stripped = _stripped_pair(model_type, overrides, tmp_path)
    ids = np.random.default_rng(0).integers(0, 90, 11).tolist()
    with Model.load(gguf, n_ctx=64) as m:
        want = m.logits(ids)
    if refusal is not None:
        with pytest.raises(ModelError, match="carries no porter graph spec") as err:
            Model.load(stripped, n_ctx=64)
        assert refusal in str(err.value) and "porter convert" in str(err.value)
        return
    with Model.load(stripped, n_ctx=64) as m:
        assert m.metadata["spec_source"].startswith("rebuilt by ")
        got = m.logits(ids)
        decoded = list(m.generate_ids(ids[:5], 6))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    with Model.load(gguf, n_ctx=64) as m:
        assert decoded == list(m.generate_ids(ids[:5], 6))


@pytest.mark.parametrize("model_type", CAUSAL)
def test_spec_stripped_file_gives_the_same_logits(model_type, tmp_path):
    """Every causal type porter writes: without its porter.graph_spec key the file gives the same
    logits (and the same greedy tokens through the KV cache), or is refused naming the cause."""
    _check(model_type, {}, NOT_REBUILDABLE.get(model_type), tmp_path)


@pytest.mark.parametrize("model_type,overrides,refusal", VARIANTS,
                         ids=[f"{t}-{'refused' if r else 'rebuilt'}-{i}" for i, (t, _, r) in enumerate(VARIANTS)])
def test_spec_stripped_variants(model_type, overrides, refusal, tmp_path):
    """Knobs the keys carry are rebuilt; what they cannot tell refuses the file rather than run wrong."""
    _check(model_type, overrides, refusal, tmp_path)


def test_files_missing_keys_are_refused(tmp_path):
    _, stripped = _stripped_pair("llama", {}, tmp_path)
    bare = tmp_path / "bare.gguf"
    strip_keys(stripped, bare, ["general.architecture"])
    with pytest.raises(ModelError, match="neither a porter graph spec .* nor general.architecture"):
        Model.load(bare)
    headless = tmp_path / "headless.gguf"
    strip_keys(stripped, headless, ["llama.embedding_length"])
    with pytest.raises(ModelError, match="the file has no llama.embedding_length"):
        Model.load(headless)


# -- the real stock file -------------------------------------------------------------------------
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
]
# Measured here (porter on the Q4_1 file vs transformers on its dequantized weights): logits
# NMSE 2.2e-3 / 2.8e-4 / 3.6e-4 over all positions, KL <= 4.7e-3, and each token of porter's
# 32-token greedy continuation within 0.22 logits of transformers' top choice there (logit
# std ~3.5). ggml quantizes the activations to 8 bits inside Q4_1 products, as llama.cpp does:
# bench/stock_gguf.py measures both on the same file, 5 prompts (86 positions): porter NMSE
# 8.1e-4, top-1 95.3%; stock llama.cpp 5.3e-4, 95.3%.
NMSE_GATE, KL_GATE, NEAR_TIE = 1e-2, 2e-2, 0.5


@pytest.mark.realmodel
@pytest.mark.parity
def test_stock_smollm2_q4_1_runs_and_matches_transformers():
    from porter.examples import materialize_smollm2, smollm2_gguf
    from porter.parity.logits import hf_logits, load_reference
    from porter.parity.metrics import kl_divergence, nmse

    hf, tok = load_reference(materialize_smollm2(progress=False))
    with Model.load(smollm2_gguf(), n_threads=2, n_ctx=256) as m:
        assert m.metadata["spec_source"] == "rebuilt by llama"
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            assert m.encode(prompt) == ids, f"{prompt!r}: tokenized differently from transformers"
            ref, got = hf_logits(hf, ids), m.logits(ids)
            assert nmse(ref, got) <= NMSE_GATE, f"{prompt!r}: logits NMSE {nmse(ref, got):.3e}"
            assert kl_divergence(ref, got) <= KL_GATE
            gen = list(m.generate_ids(ids, 32))
            # transformers, teacher-forced on porter's continuation: porter's every pick is its top
            # token, or a near-tie with it
            seen = hf_logits(hf, ids + gen)[len(ids) - 1:-1]
            gap = seen.max(-1) - seen[np.arange(len(gen)), gen]
            assert gap.max() <= NEAR_TIE, f"{prompt!r}: {m.decode(gen)!r} leaves transformers' choice by {gap.max():.3f}"
        assert m.decode(m.encode("Hello, world! In 2024,  333 people")) == "Hello, world! In 2024,  333 people"


# -- porter inspect FILE.gguf --------------------------------------------------------------------
def _inspect(*args):
    from click.testing import CliRunner

    from porter.introspect.cli import inspect_command

    return CliRunner().invoke(inspect_command, [str(a) for a in args])


def test_inspect_gguf_with_and_without_spec(tmp_path):
    import json

    gguf, stripped = _stripped_pair("qwen3", {}, tmp_path)
    for path, porter_spec in ((gguf, True), (stripped, False)):
        result = _inspect(path, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["architecture"] == "qwen3" and data["model_type"] == "qwen3"
        assert data["porter_spec"] is porter_spec
        assert data["spec_source"] == ("file" if porter_spec else "rebuilt by qwen3 from llama.cpp's keys")
        assert data["hparams"]["n_layer"] == 2 and data["hparams"]["n_embd"] == 64
        assert data["llama_cpp_keys"]["block_count"] == 2
        with Model.load(path) as m:
            assert data["n_tensors"] == len(m.spec.weight_names())
        assert data["tensor_types"] == {"F32": data["n_tensors"]}
    text = _inspect(stripped).output
    assert "graph spec: none in the file; rebuilt by qwen3" in text and "qwen3.block_count = 2" in text


def test_inspect_gguf_that_cannot_be_rebuilt_and_bad_paths(tmp_path):
    _, stripped = _stripped_pair("gemma2", {}, tmp_path)
    result = _inspect(stripped)
    assert result.exit_code == 0, result.output
    assert "none can be rebuilt" in result.output and "query_pre_attn_scalar" in result.output
    missing = _inspect(tmp_path / "missing.gguf")
    assert missing.exit_code != 0 and isinstance(missing.exception, ModelError)
    assert "no such GGUF file" in str(missing.exception)


@pytest.mark.realmodel
def test_inspect_stock_smollm2():
    from porter.examples import smollm2_gguf

    result = _inspect(smollm2_gguf())
    assert result.exit_code == 0, result.output
    for text in ("architecture: llama", "file type: MOSTLY_Q4_1", "rebuilt by llama", "Q4_1 x210", "Q8_0 x1",
                 "tokenizer: gpt2, 49152 tokens, pre-tokenizer smollm", "llama.attention.head_count_kv = 3",
                 "n_layer = 30", "272 tensors"):
        assert text in result.output, text


def test_a_rebuilt_spec_is_cached_and_later_loads_skip_transformers(tmp_path):
    """The first load of a stock file rebuilds its spec (transformers gives the config defaults)
    and tokenizer; the next loads read both from the cache: no transformers, no torch, the same
    logits and token ids. A damaged
    entry is rebuilt and replaced; PORTER_SPEC_CACHE=0 writes nothing."""
    import json

    _, stripped = _stripped_pair("llama", {}, tmp_path)
    cache = tmp_path / "cache"
    first = load_in_child(stripped, cache)
    assert first["transformers"] and first["source"] == "rebuilt by llama"
    (entry,) = (cache / "specs").iterdir()  # a tiny checkpoint has no vocabulary: only the spec
    assert entry.name.endswith("-spec.json")
    second = load_in_child(stripped, cache)
    assert not second["transformers"] and not second["torch"] and second["source"] == "rebuilt by llama"
    assert second["logits"] == first["logits"] and second["ids"] == first["ids"]
    entry.write_text('{"spec": "{not json", "model_type": "llama", "config": {}}')
    third = load_in_child(stripped, cache)
    assert third["transformers"] and third["logits"] == first["logits"]
    assert json.loads(json.loads(entry.read_text())["spec"])["format"] == "porter-graph-spec"  # replaced
    off = tmp_path / "off"
    assert load_in_child(stripped, off, PORTER_SPEC_CACHE="0")["logits"] == first["logits"]
    assert not off.exists()
