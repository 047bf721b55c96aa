"""BF16 matrices are held as F16 when their values fit: the same weights, float16 activations
inside the products instead of ggml's bfloat16 ones."""

from __future__ import annotations

import numpy as np
import pytest

import porter
from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.runtime.model import _bf16_as_f16, _bf16_fits_f16
from porter.runtime.types import GGMLType
from porter.testing.parity import port_tiny

IDS = [3, 17, 42, 5, 88, 61, 9, 23, 70, 11, 2, 36]


def _as_bf16_bits(values) -> np.ndarray:
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_normal_values_convert_exactly_and_out_of_range_ones_refuse():
    bits = _as_bf16_bits([0.0, -1.5, 3.140625, 1e-3, 6.1e-5, 60000.0])
    assert _bf16_fits_f16(bits)
    half = _bf16_as_f16(bits)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(half.astype(np.float32), back)
    tiny = _as_bf16_bits([1.234e-6, -3.3e-7])  # float16 subnormals: rounded by at most 2**-25
    assert _bf16_fits_f16(tiny)
    assert np.max(np.abs(_bf16_as_f16(tiny).astype(np.float32) - (tiny.astype(np.uint32) << 16).view(np.float32))) <= 2.0 ** -25
    assert not _bf16_fits_f16(_as_bf16_bits([1.0, 70000.0]))  # overflows float16
    assert not _bf16_fits_f16(_as_bf16_bits([1.0, np.nan]))


def test_bf16_held_as_f16_is_closer_to_transformers(tmp_path):
    with port_tiny("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path, outtype="bf16") as pair:
        ref = hf_logits(pair.hf, IDS)
        as_f16 = pair.porter
        assert as_f16.bf16_as_f16 and all(as_f16.weights[n].type == GGMLType.F16 for n in as_f16.bf16_as_f16)
        assert "blk.0.attn_q.weight" in as_f16.bf16_as_f16 and "token_embd.weight" in as_f16.bf16_as_f16
        with porter.load(pair.gguf, bf16_as_f16=False) as plain:
            assert plain.bf16_as_f16 == [] and plain.weights["blk.0.attn_q.weight"].type == GGMLType.BF16
            err_plain = nmse(ref, plain.logits(IDS))
        err_f16 = nmse(ref, as_f16.logits(IDS))
    assert err_f16 <= 1e-4, f"bf16 logits NMSE {err_f16:.2e}"
    assert err_f16 < err_plain, f"F16 products {err_f16:.2e} vs BF16 products {err_plain:.2e}"


@pytest.mark.parametrize("value, kept", [(1.0, "F16"), (1e5, "BF16")])
def test_a_matrix_beyond_float16_range_stays_bf16(value, kept, tmp_path):
    import torch

    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    ckpt = tiny_checkpoint(architectures()["llama"], tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = torch.tensor(value)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    convert(ckpt, tmp_path / "m.gguf", "bf16", progress=False)
    with porter.load(tmp_path / "m.gguf") as m:
        assert m.weights["blk.0.ffn_down.weight"].type == GGMLType[kept]
        assert np.all(np.isfinite(m.logits(IDS)))
