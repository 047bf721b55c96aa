"""SmolLM2-135M-Instruct through the traced path (torch.export of its real configuration on the
meta device, lowered to porter's ops), compared with transformers on the real weights."""

from __future__ import annotations

import pytest

from test_smollm2 import assert_greedy_32_and_logits_match  # same prompts and gates as the declared port

import porter
from porter.parity.logits import load_reference

pytestmark = [pytest.mark.realmodel, pytest.mark.parity]



@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    from porter.examples import materialize_smollm2
    from porter.pipeline import port

    ckpt = materialize_smollm2(progress=False)
    d = tmp_path_factory.mktemp("smollm2-traced")
    result = port(str(ckpt), out=d / "smollm2.traced.f32.gguf", traced=True, workdir=d, progress=False)
    hf, tok = load_reference(ckpt)
    with porter.load(result.gguf, n_threads=2, n_ctx=256) as m:
        yield result, hf, tok, m


def test_traced_spec_is_one_loop_at_the_real_configuration(traced):
    result, hf, _, m = traced
    assert result.route == "traced" and result.forced  # the llama plugin claims it: --traced
    assert m.spec.layer_loop is not None
    assert int(m.spec.hparams["n_layer"]) == hf.config.num_hidden_layers == 30
    assert {"rms_norm", "rope", "flash_attn", "kv_store"} <= {n.op for n in m.spec.layer_loop.body}


def test_traced_greedy_32_tokens_identical_and_logits_nmse(traced):
    _, hf, tok, m = traced
    assert_greedy_32_and_logits_match(hf, tok, m)
