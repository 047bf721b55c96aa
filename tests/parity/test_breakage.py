"""The harness can fail: ports broken on purpose are caught, and the first diverging node is named."""

from __future__ import annotations

import numpy as np
import pytest

from porter.parity.harness import run_parity
from porter.plugins import architectures
from porter.testing.parity import assert_parity, port_tiny

pytestmark = pytest.mark.parity
Llama = architectures()["llama"]
Qwen2 = architectures()["qwen2"]
Qwen3 = architectures()["qwen3"]
IDS = [3, 17, 42, 5, 88, 61, 9, 23, 70, 11, 2, 36]


class WrongRopeLayout(Llama):
    """q/k rows permuted for adjacent-pair rope, but rotated as halves."""

    def spec_hparams(self):
        values = super().spec_hparams()
        values["rope_mode"] = 2
        return values


class DroppedBias(Qwen2):
    """Forgets the q/k/v projection biases."""

    def configure(self, k):
        super().configure(k)
        k["q_bias"] = k["k_bias"] = k["v_bias"] = False


class WrongEpsilon(Llama):
    def spec_hparams(self):
        values = super().spec_hparams()
        values["norm_eps"] = 0.5
        return values


class SwappedHeads(Qwen3):
    """Swaps the first two query heads while converting."""

    def transform(self, gguf_name, arrays):
        w = super().transform(gguf_name, arrays)
        if gguf_name.endswith("attn_q.weight"):
            d = self.hp.head_dim
            w = w.copy()
            w[:d], w[d:2 * d] = arrays[0][d:2 * d], arrays[0][:d]
        return w


@pytest.mark.parametrize("broken, first_node", [
    (WrongRopeLayout, "attn_out-0"),
    (DroppedBias, "Qcur-0"),
    (WrongEpsilon, "attn_norm-0"),
    (SwappedHeads, "Qcur-0"),
])
def test_broken_port_fails_at_the_right_node(broken, first_node, tmp_path):
    with port_tiny(broken, {"num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path) as pair:
        report = run_parity(pair.hf, pair.porter, IDS, "f32")
        assert not report.passed
        first = report.first_divergence
        assert first is not None and first.node == first_node, (
            f"{broken.__name__}: first divergence {first and first.node}, expected {first_node}")
        assert first.layer == 0
        with pytest.raises(AssertionError, match=f"first diverging node: {first_node}"):
            assert_parity(pair, IDS)


def test_the_unbroken_parents_pass(tmp_path):
    for i, cls in enumerate((Llama, Qwen2, Qwen3)):
        with port_tiny(cls, {"num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path / str(i)) as pair:
            report = assert_parity(pair, IDS)
            assert report.logits["nmse"] < 1e-10
            assert np.isfinite(report.logits["kl"])


@pytest.mark.parametrize("broken, first_node", [(WrongRopeLayout, "attn_out-0"), (DroppedBias, "Qcur-0")])
def test_at_q8_0_the_stream_gate_still_catches_a_broken_port(broken, first_node, tmp_path):
    """With rounded weights only the residual stream is gated; a real bug still fails there, and
    the first node over tolerance (gated or not) still points at its cause."""
    with port_tiny(broken, {"num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path, outtype="q8_0") as pair:
        report = run_parity(pair.hf, pair.porter, IDS, "q8_0")
        assert not report.passed
        assert report.first_divergence.node == "l_out-0"
        assert report.first_over.node == first_node
        assert {n.role for n in report.nodes if n.gated} <= {"inp_embd", "l_out", "result_norm", "result_output"}


def test_at_f32_every_node_is_gated(tmp_path):
    with port_tiny(Llama, {"num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path) as pair:
        report = run_parity(pair.hf, pair.porter, IDS, "f32")
        assert report.nodes and all(n.gated for n in report.nodes)



def _damage(path, name, index):
    """One NaN written into a GGUF's tensor in place (convert refuses NaN weights: a file damaged after)."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[index] = np.nan
    tensor.data.flush()


@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_non_finite_values_fail_naming_the_first_node(outtype, tmp_path):
    """NaN from porter fails parity at any weight type (q4_0 has no NMSE gate: it is still a
    failure), and the report names the first node where porter's values stop being finite."""
    import porter
    from rich.console import Console

    from porter.parity import certificate

    with port_tiny(Llama, {"num_hidden_layers": 3}, tmp_path, outtype=outtype) as pair:
        pair.porter.close()
        _damage(pair.gguf, "blk.1.ffn_norm.weight", 3)
        pair.porter = porter.load(pair.gguf)
        report = run_parity(pair.hf, pair.porter, IDS, outtype)
        assert not report.passed
        # at f32 the NaN reaches the logits; at q4_0 the activations' Q8_0 rounding before the
        # quantized matmuls turns it into ordinary numbers: the node still names it
        assert report.finite is (outtype != "f32")
        assert report.first_nonfinite.node == "ffn_norm-1"
        assert report.reference_nonfinite is None
        assert report.as_dict()["first_nonfinite"] == "ffn_norm-1"
        console = Console(record=True, width=200)
        assert certificate.show(console, [report], title="t", outtype=outtype, quiet=True) is False
        text = console.export_text()
        assert "porter computes NaN or infinity from node ffn_norm-1 (layer 1" in text and "FAIL" in text, text
        with pytest.raises(AssertionError, match="first non-finite node: ffn_norm-1"):
            assert_parity(pair, IDS)
