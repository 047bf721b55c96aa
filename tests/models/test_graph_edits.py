"""Graph edits and constant weights end to end (classes ported directly, not registered as plugins): an Architecture's edit_graph changes what the
runtime computes, and a constant declared in the spec is loaded with its shape and values."""

from __future__ import annotations

import numpy as np

from porter.arch import Llama
from porter.parity.logits import hf_logits
from porter.parity.metrics import nmse
from porter.testing import assert_parity, port_tiny


class DoubledLogits(Llama):
    """Llama whose logits pass through a constant [1, n_vocab] of twos (a 2-D constant)."""

    def edit_graph(self, g):
        n_vocab = self.hp.vocab_size
        g.constant("test.twos", np.full(n_vocab, 2.0), [1, n_vocab])
        g.rename("result_output", "logits_single")  # the runtime reads the logits from result_output
        g.insert_after("logits_single", "result_output", "mul", ["logits_single", "test.twos"])


class UnitScaledAttention(Llama):
    """Llama with a (neutral) per-channel scale of ones after every attention output."""

    def edit_graph(self, g):
        g.constant("test.ones", np.ones(self.hp.hidden_size))
        g.insert_after("attn_out-{L}", "attn_unit-{L}", "mul", ["attn_out-{L}", "test.ones"], rewire=True)


def test_a_constant_changes_the_output_by_its_values(tmp_path):
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with port_tiny(DoubledLogits, {"num_hidden_layers": 1}, tmp_path) as pair:
        assert pair.porter.spec.outputs == ["result_output"]
        got = pair.porter.logits(ids)
        ref = hf_logits(pair.hf, ids)
        assert nmse(2 * ref, got) < 1e-12  # twice transformers' logits: the constant's values arrived
        assert nmse(ref, got) > 0.5


def test_an_edit_inside_the_layer_loop_keeps_parity(tmp_path):
    with port_tiny(UnitScaledAttention, {"num_hidden_layers": 2}, tmp_path) as pair:
        body = {n.name: n for n in pair.porter.spec.layer_loop.body}
        assert body["ffn_inp-{L}"].inputs[0] == "attn_unit-{L}"
        assert pair.porter.spec.produced_by["edited_by"].endswith("UnitScaledAttention.edit_graph")
        assert_parity(pair, list(range(1, 20)))
