"""porter quantize: an f32 porter GGUF requantized (q8_0, llama.cpp's Q4_K_M mix) loads and computes
what transformers computes with the weights it stores; the input is never touched; a failure leaves nothing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader

import porter
from porter.cli import main
from porter.convert.quantize import quantize
from porter.errors import ModelError, PorterError
from porter.parity.metrics import nmse

# rows of 256 so that the K-quants fit; 8 layers so that llama.cpp's use_more_bits picks 0, 3, 6 and 7
TINY = {"hidden_size": 256, "intermediate_size": 256, "head_dim": 64, "num_hidden_layers": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from porter.testing.parity import port_tiny

    # closed at the end of the module: tests/runtime/test_lifetimes.py counts live ggml objects
    with port_tiny("llama", TINY, tmp_path_factory.mktemp("quantize")) as pair:
        yield pair


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kv(path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("ftype", ["q8_0", "Q4_K_M", "Q5_K_M"])
def test_requantized_file_matches_transformers_on_its_weights(tiny, ftype, tmp_path):
    import torch

    from porter.parity.logits import load_reference
    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture

    before = digest(tiny.gguf)
    out = tmp_path / f"tiny.{ftype}.gguf"
    result = CliRunner().invoke(main, ["quantize", str(tiny.gguf), str(out), ftype])
    assert result.exit_code == 0, result.output
    assert digest(tiny.gguf) == before

    old, new = kv(tiny.gguf), kv(out)
    assert new.pop("general.file_type") == {"q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}[ftype]
    old.pop("general.file_type")
    assert new == old  # the graph spec, tokenizer and every other key kept

    got = types(out)
    if ftype == "q8_0":
        assert {got[n] for n in got if not n.endswith("norm.weight")} == {"Q8_0"}
    else:  # llama_tensor_get_type's _M mixes: Q6_K for attn_v and ffn_down of layers 0, 3, 6, 7
        base, more = ftype[:4], {0, 3, 6, 7}
        for i in range(8):
            for role in ("attn_v", "ffn_down"):
                assert got[f"blk.{i}.{role}.weight"] == ("Q6_K" if i in more else base)
            assert got[f"blk.{i}.attn_q.weight"] == got[f"blk.{i}.ffn_up.weight"] == base
        assert got["output.weight"] == "Q6_K" and got["token_embd.weight"] == base
    assert got["blk.0.attn_norm.weight"] == "F32"

    ids = np.random.default_rng(1).integers(0, 97, size=24).tolist()
    with porter.load(out, n_threads=2) as m:
        logits = m.logits(ids)
    plan = architecture(tiny.checkpoint).conversion_plan()
    checkpoint_with_gguf_weights(tiny.checkpoint, plan, out, tmp_path / "same")
    hf = load_reference(tmp_path / "same")[0]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    error = nmse(want, logits)
    assert error <= 5e-3, f"{ftype}: logits NMSE {error:.2e}"  # the q8_0 gate: ggml rounds activations to 8 bits in quantized products


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "never.gguf"
    result = CliRunner().invoke(main, ["quantize", str(tiny.gguf), str(out), "q4_k_m", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:5] == ["tensor", "shape", "from", "to", "size"]
    row = next(line for line in lines if line.startswith("blk.3.attn_v.weight"))
    assert row.split()[1:4] == ["128x256", "F32", "Q6_K"] and "Q4_K_M mix" in row  # 2 kv heads x 64
    assert lines[-1].startswith("total: ") and "MiB ->" in lines[-1]
    pure = CliRunner().invoke(main, ["quantize", str(tiny.gguf), str(out), "q4_k_m", "--dry-run", "--pure"])
    assert next(line for line in pure.output.splitlines() if line.startswith("blk.3.attn_v.weight")).split()[3] == "Q4_K"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refusals_leave_no_output(tiny, tmp_path):
    with pytest.raises(PorterError, match="never overwrites its input"):
        quantize(tiny.gguf, tiny.gguf, "q8_0", force=True)
    q8 = tmp_path / "q8.gguf"
    quantize(tiny.gguf, q8, "q8_0")
    with pytest.raises(PorterError, match="already exists"):
        quantize(tiny.gguf, q8, "q4_0")
    with pytest.raises(ModelError, match="already holds quantized tensors"):
        quantize(q8, tmp_path / "again.gguf", "q4_0")
    result = CliRunner().invoke(main, ["quantize", str(tiny.gguf), str(tmp_path / "x.gguf"), "q3_x"])
    assert result.exit_code == 1 and "unknown type 'q3_x'" in result.output

    # a NaN in the last tensor: found while writing; the partial file is removed
    damaged = tmp_path / "damaged.gguf"
    data = bytearray(tiny.gguf.read_bytes())
    last = GGUFReader(tiny.gguf).tensors[-1]
    data[last.data_offset:last.data_offset + 4] = np.float32(np.nan).tobytes()
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="NaN"):
        quantize(damaged, tmp_path / "out.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.gguf", "q8.gguf"]


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0", "q6_k"])
def test_same_bytes_as_converting_to_the_type(tiny, ftype, tmp_path):
    """Requantizing the f32 file stores exactly what `porter convert -t TYPE` stores (output
    projection upgrade included), tensor by tensor."""
    from porter.pipeline import convert

    quantize(tiny.gguf, tmp_path / "q.gguf", ftype)
    convert(tiny.checkpoint, tmp_path / "c.gguf", ftype, progress=False)
    q, c = GGUFReader(tmp_path / "q.gguf").tensors, GGUFReader(tmp_path / "c.gguf").tensors
    assert [t.name for t in q] == [t.name for t in c]
    for a, b in zip(q, c):
        assert a.tensor_type == b.tensor_type, a.name
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), a.name
