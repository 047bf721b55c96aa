"""porter-highway's parity suite: its port against its own transformers model, across its
configuration space (porter's shared shapes, Llama's biases and rope types, and this package's
``space``), node by node. porter's pytest plugin (fixture ``porter_port``, hypothesis profiles)
loads by itself once porter is installed: ``pytest --hypothesis-profile=ci``."""

from hypothesis import given, settings
from hypothesis import strategies as st

from porter.testing import assert_cache_consistent, assert_parity, configs, port_tiny


@settings(max_examples=6)
@given(config=configs("highway"), data=st.data())
def test_parity_across_the_config_space(porter_port, config, data):
    pair = porter_port("highway", config)
    n = data.draw(st.integers(2, 24), label="tokens")
    ids = data.draw(st.lists(st.integers(0, config["vocab_size"] - 1), min_size=n, max_size=n), label="ids")
    assert_parity(pair, ids, context=str(config))
    assert_cache_consistent(pair, ids, split=n // 2, context=str(config))


def test_the_port_runs_the_macro_and_the_edit(porter_port):
    pair = porter_port("highway", {"layer_scale": True})
    body = {n.name: n for n in pair.porter.spec.layer_loop.body}
    assert body["hwy_t-{L}"].op == "sigmoid"  # from highway/blocks.j2
    assert body["ffn_inp-{L}"].inputs[0] == "attn_ls-{L}"  # the edit's LayerScale feeds the residual add
    report = assert_parity(pair, [1, 5, 9, 2, 40, 7])  # ids below 41, the smallest vocabulary configs() draws
    compared = {n.node for n in report.nodes}
    assert {"ffn_out-0", "attn_out-0", "l_out-0"} <= compared  # the macro's output against transformers' mlp


def test_without_the_edit_parity_fails(tmp_path):
    """The suite can fail: a port that forgets LayerScale diverges right after the attention
    (whose own output still matches): at the norm that reads the residual sum."""
    import pytest

    from porter.plugins import architectures

    class NoLayerScale(architectures()["highway"]):
        def edit_graph(self, g):
            pass

    with port_tiny(NoLayerScale, {"layer_scale": True}, tmp_path) as pair:
        with pytest.raises(AssertionError, match="first diverging node: ffn_norm-0 "):
            assert_parity(pair, [1, 5, 9, 2, 40, 7])
