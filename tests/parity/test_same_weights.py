"""Mapping a GGUF's stored (rounded) weights back onto the checkpoint it came from."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

from porter.convert.plan import TensorPlan
from porter.errors import PorterError
from porter.parity.same_weights import checkpoint_with_gguf_weights
from porter.pipeline import architecture, convert
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint

# one plugin per kind of transform: q/k row permutation, transposed Conv1D, per-group qkv
# interleave, renamed output, fused qkv and gate_up, stacked experts, encoder
KINDS = ["llama", "gpt2", "falcon", "gpt_neox", "phi3", "mixtral", "bert"]


def _tensors(path):
    return {t.name: quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("model_type", KINDS)
def test_checkpoint_with_gguf_weights_converts_back_to_the_stored_values(model_type, tmp_path):
    ckpt = tiny_checkpoint(architectures()[model_type], tmp_path / "ckpt")
    convert(ckpt, tmp_path / "q8.gguf", "q8_0", progress=False)
    plan = architecture(ckpt).conversion_plan()
    same = tmp_path / "same" / "ckpt"  # named as the original: the folder's name names the model in the GGUF
    changed = checkpoint_with_gguf_weights(ckpt, plan, tmp_path / "q8.gguf", same)
    quantized = {t.name for t in GGUFReader(str(tmp_path / "q8.gguf")).tensors
                 if t.tensor_type != GGMLQuantizationType.F32}
    assert set(changed) == quantized and changed

    convert(same, tmp_path / "back.f32.gguf", "f32", progress=False)
    convert(ckpt, tmp_path / "orig.f32.gguf", "f32", progress=False)
    stored, back, original = (_tensors(tmp_path / f) for f in ("q8.gguf", "back.f32.gguf", "orig.f32.gguf"))
    for name in changed:
        np.testing.assert_array_equal(back[name], stored[name], err_msg=name)
        assert not np.array_equal(original[name], stored[name]), f"{name}: q8_0 left the weights unchanged?"
    # and the copy re-quantizes to the very same file (Q8_0 is idempotent on its own grid)
    convert(same, tmp_path / "again.gguf", "q8_0", progress=False)
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "q8.gguf").read_bytes()


def test_a_transform_that_computes_is_refused_by_name(tmp_path):
    ckpt = tiny_checkpoint(architectures()["llama"], tmp_path / "ckpt")
    convert(ckpt, tmp_path / "q8.gguf", "q8_0", progress=False)
    plan = architecture(ckpt).conversion_plan()
    q = next(i for i, t in enumerate(plan.tensors) if t.gguf_name == "blk.0.attn_q.weight")
    plan.tensors[q] = TensorPlan("blk.0.attn_q.weight", plan.tensors[q].sources, transform=lambda a: a[0] * 2.0)
    with pytest.raises(PorterError, match=r"blk\.0\.attn_q\.weight: its transform computes new values"):
        checkpoint_with_gguf_weights(ckpt, plan, tmp_path / "q8.gguf", tmp_path / "same")
