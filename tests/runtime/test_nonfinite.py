"""Damaged weights are reported: `porter verify` names tensors holding NaN or infinity, and a
forward pass whose logits are not finite fails naming the first node that went non-finite
(before, NaN weights gave NaN logits and text silently)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import porter
import tinygguf
from porter.cli import main
from porter.errors import ModelError


def damaged(tmp_path):
    w = tinygguf.tensors()
    w["blk.1.attn_norm.weight"][2] = np.nan
    return tinygguf.write(tmp_path / "nan.gguf", weights=w)


def test_verify_names_the_damaged_tensor(tmp_path):
    r = CliRunner().invoke(main, ["verify", str(damaged(tmp_path))])
    assert r.exit_code == 1 and "1 tensor(s) hold NaN or infinite values: blk.1.attn_norm.weight (1 values)" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", str(tinygguf.write(tmp_path / "ok.gguf"))])
    assert r.exit_code == 0 and "every tensor is finite" in r.output, r.output


def test_verify_dequantizes_quantized_tensors(tmp_path):
    import gguf

    w = tinygguf.tensors()
    q = gguf.quants.quantize(np.ones((8, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    q = q.copy()
    q[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)  # the first block's scale
    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "tiny")
    for name, a in w.items():
        writer.add_tensor(name, a)
    writer.add_tensor("extra.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 1 and "extra.weight (32 values)" in r.output, r.output


def test_generation_stops_at_non_finite_logits_naming_the_node(tmp_path):
    with porter.load(damaged(tmp_path)) as m:
        assert m.first_nonfinite_node([1, 2]) == "normed-1"
        with pytest.raises(ModelError, match=r"non-finite logits .* the first node that is not finite is normed-1.*porter verify"):
            list(m.generate_ids([1, 2], 3))
