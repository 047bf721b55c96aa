"""The extension points outside plugin authors use: plugin modules loaded without installing
them, template namespaces and block slots, graph edits (and their validation), constant weights,
the features list, porter's base classes, `porter generate --package` and `porter parity --set`.
No transformers model is built here except where a spec is rendered."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from porter import plugins, render
from porter.cli import main
from porter.errors import PorterError, SpecError


@pytest.fixture
def load_plugin(tmp_path, monkeypatch):
    """Write a plugin module into tmp_path and load it through PORTER_PLUGINS (not installed)."""
    loaded = []

    def load(source: str, name: str = "tryout_plugin", templates: dict[str, str] | None = None):
        (tmp_path / "templates").mkdir(exist_ok=True)
        for rel, text in (templates or {}).items():
            path = tmp_path / "templates" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        loaded.append(str(tmp_path / f"{name}.py"))
        monkeypatch.setenv(plugins.PLUGINS_ENV, ",".join(loaded))
        plugins.manager.cache_clear()
        render.environment.cache_clear()
        return tmp_path

    yield load
    monkeypatch.delenv(plugins.PLUGINS_ENV, raising=False)
    plugins.manager.cache_clear()
    render.environment.cache_clear()


TRYOUT = '''
    from pathlib import Path
    from porter.arch import Llama
    from porter.plugins import hookimpl

    class Tryout(Llama):
        model_type = "{model_type}"
        features = ("rmsnorm", "rope", "gqa", "swiglu", "tryout_feature")
        {body}

    @hookimpl
    def porter_architectures():
        return [Tryout]

    @hookimpl
    def porter_features():
        return {{"tryout_feature": "what the test plugin adds"}}

    @hookimpl
    def porter_templates():
        return {{"tryout": Path(__file__).parent / "templates"}}
'''


# helium: a llama-like type transformers ships and porter has no plugin for (no config class needed)
def tryout(body: str = "pass", model_type: str = "helium") -> str:
    return TRYOUT.format(body=textwrap.indent(textwrap.dedent(body), " " * 8).strip(), model_type=model_type)


def spec_of(cls):
    from porter.introspect import introspect

    return cls(introspect(cls.model_type)).spec()


# -- loading plugins that are not installed ------------------------------------------------------

def test_porter_arch_exports_the_builtin_classes():
    from porter.arch import FusedQKV, Llama, Qwen3
    from plugins._common import FusedQKV as F
    from plugins.llama import Llama as L
    from plugins.qwen3 import Qwen3 as Q

    assert (Llama, Qwen3, FusedQKV) == (L, Q, F)
    import porter.arch

    with pytest.raises(AttributeError, match="no attribute 'Lama'.*Llama"):
        porter.arch.Lama  # noqa: B018


def test_a_plugin_file_is_tried_without_installing(load_plugin):
    load_plugin(tryout())
    cls = plugins.architectures()["helium"]
    assert cls.__name__ == "Tryout" and not plugins.is_builtin(cls) and plugins.package_of(cls) == "tryout_plugin"
    assert "helium" not in plugins.builtin_architectures()
    assert spec_of(cls).produced_by["plugin"] == "tryout_plugin"


def test_cli_plugin_option_and_its_errors(tmp_path):
    good = tmp_path / "cli_tryout.py"
    good.write_text(textwrap.dedent('''
        from porter.arch import Qwen3
        from porter.plugins import hookimpl

        class Q3Variant(Qwen3):
            model_type = "qwen3"
            family = "tryout-family"

        @hookimpl
        def porter_architectures():
            return [Q3Variant]
    '''))
    try:
        r = CliRunner().invoke(main, ["--plugin", str(good), "plugins"])
        assert r.exit_code != 0 and "two plugins port model_type 'qwen3'" in r.output
        empty = tmp_path / "no_hooks.py"
        empty.write_text("x = 1\n")
        r = CliRunner().invoke(main, ["--plugin", str(empty), "plugins"])
        assert r.exit_code == 1 and "implements no porter hook" in r.output
        r = CliRunner().invoke(main, ["--plugin", "surely_not_a_module_here", "plugins"])
        assert r.exit_code == 1 and "cannot be imported: ModuleNotFoundError" in r.output
        assert r.output.count("\n") == 1  # one line, no traceback
    finally:
        plugins._added.clear()
        plugins.manager.cache_clear()
        render.environment.cache_clear()


def test_unknown_features_are_rejected(load_plugin):
    load_plugin(tryout().replace('"tryout_feature")', '"tryout_feature", "rmsnrom")'))
    with pytest.raises(PorterError, match="features 'rmsnrom' are neither in porter's list"):
        plugins.architectures()


def test_builtin_features_are_all_documented():
    from porter.features import FEATURES

    for cls in plugins.builtin_architectures().values():
        assert set(cls.features) <= set(FEATURES), cls


# -- templates: namespaces and block slots -------------------------------------------------------

SCALED_MLP = {"blocks.j2": '''  # templates/blocks.j2 is "tryout/blocks.j2"
    {%- import "porter/blocks.j2" as b -%}
    {#- porter's gated MLP, then its output halved -#}
    {%- macro half_mlp(g, k, sfx, x, blk, hf_mlp) -%}
    {{- b.linear(g, "ffn_gate", sfx, x, blk ~ ".ffn_gate") -}}
    {{- b.linear(g, "ffn_up", sfx, x, blk ~ ".ffn_up") -}}
    {{- block(k, "activation")(g, k, "ffn_act", sfx, "ffn_gate" ~ sfx) -}}
    {{- b.node(g, "ffn_gated" ~ sfx, "mul", ["ffn_act" ~ sfx, "ffn_up" ~ sfx]) -}}
    {{- b.linear(g, "ffn_full", sfx, "ffn_gated" ~ sfx, blk ~ ".ffn_down") -}}
    {{- b.node(g, "ffn_out" ~ sfx, "scale", ["ffn_full" ~ sfx], {"s": 0.5}, hf=hf_mlp) -}}
    {%- endmacro -%}
'''}


def test_a_plugin_macro_fills_a_slot(load_plugin):
    load_plugin(tryout('knobs = {"blocks": {"mlp": "tryout/blocks.j2:half_mlp"}}'), templates=SCALED_MLP)
    spec = spec_of(plugins.architectures()["helium"])
    body = {n.name: n for n in spec.layer_loop.body}
    assert body["ffn_out-{L}"].op == "scale" and body["ffn_full-{L}"].inputs[0] == "blk.{L}.ffn_down.weight"
    assert body["l_out-{L}"].inputs == ["ffn_out-{L}", "ffn_inp-{L}"]  # the layout is porter's


@pytest.mark.parametrize("ref, message", [
    ("tryout/blocks.j2:no_such_macro", "defines no macro 'no_such_macro'"),
    ("tryout/missing.j2:half_mlp", "no template 'tryout/missing.j2' on porter's template path"),
    ("half_mlp", "write 'namespace/file.j2:macro'"),
])
def test_bad_block_references_are_clear(load_plugin, ref, message):
    load_plugin(tryout(f'knobs = {{"blocks": {{"mlp": "{ref}"}}}}'), templates=SCALED_MLP)
    with pytest.raises(SpecError, match=message):
        spec_of(plugins.architectures()["helium"])


def test_unknown_slot_and_reserved_namespace(load_plugin):
    load_plugin(tryout('knobs = {"blocks": {"ffn": "tryout/blocks.j2:half_mlp"}}'), templates=SCALED_MLP)
    with pytest.raises(SpecError, match=r"unknown slots \['ffn'\]"):
        spec_of(plugins.architectures()["helium"])
    load_plugin(tryout().replace('{"tryout": Path', '{"porter": Path'), name="tryout_reserved")
    with pytest.raises(PorterError, match="namespace 'porter' is not allowed"):
        render.environment()


# -- graph edits ---------------------------------------------------------------------------------

def test_graph_edit_helpers_and_constants(load_plugin):
    load_plugin(tryout('''
        def edit_graph(self, g):
            super().edit_graph(g)
            g.constant("tryout.halves", [0.5] * self.hp.hidden_size, [self.hp.hidden_size])
            g.insert_after("attn_out-{L}", "attn_half-{L}", "mul", ["attn_out-{L}", "tryout.halves"], rewire=True)
            g.replace("ffn_act-{L}", "relu2", attrs={})
            g.insert_after("l_out-{L}", "l_final-{L}", "scale", ["l_out-{L}"], {"s": 1.0}, rewire=True)
    '''))
    spec = spec_of(plugins.architectures()["helium"])
    body = {n.name: n for n in spec.layer_loop.body}
    assert body["ffn_inp-{L}"].inputs[0] == "attn_half-{L}"  # readers of attn_out now read the new node
    assert body["ffn_act-{L}"].op == "relu2"
    assert spec.layer_loop.result == "l_final-{L}"  # rewire follows the loop's result too
    const = next(w for w in spec.weights if w.name == "tryout.halves")
    assert const.data[:2] == [0.5, 0.5] and "tryout.halves" not in spec.weight_names()  # not a GGUF tensor


@pytest.mark.parametrize("edit, message", [
    ('g.insert_after("attn_out-{L}", "x-{L}", "nonsense_op", ["attn_out-{L}"])', "op 'nonsense_op' is not in"),
    ('g.insert_after("attn_out-{L}", "no_layer_index", "cont", ["attn_out-{L}"])', "must contain {L}"),
    ('g.insert_after("attn_out", "x-{L}", "cont", ["attn_out-{L}"])', "no node named 'attn_out'"),
    ('g.replace("ffn_out-{L}", inputs=["not_a_node-{L}"])', "'not_a_node-{L}' is not an earlier node"),
    ('g.remove("attn_out-{L}")', "still read by ffn_inp-{L}"),
    ('g.constant("tryout.bad", [1, 2, 3], [2, 2])', "has 3 values, shape \\[2, 2\\] needs 4"),
    ('g.insert_after("result_output", "res2", "scale", ["result_output"], {"s": 1.0}); g.outputs[0] = "res2"',
     "outputs must stay \\['result_output'\\]"),
])
def test_bad_graph_edits_are_reported_with_the_editor(load_plugin, edit, message):
    load_plugin(tryout(f'''
        def edit_graph(self, g):
            {edit}
    '''))
    with pytest.raises(SpecError, match=message) as info:
        spec_of(plugins.architectures()["helium"])
    if "is not" in message or "must contain" in message or "must stay" in message:
        assert "after the graph edit of Tryout.edit_graph" in str(info.value)


def test_the_hook_edits_other_architectures_and_is_validated(load_plugin):
    load_plugin(tryout() + '''
    @hookimpl
    def porter_edit_graph(arch, graph):
        if arch.model_type == "qwen3":
            graph.replace("result_output", "nonsense")
''')
    with pytest.raises(SpecError, match="after the graph edit of plugin tryout_plugin"):
        spec_of(plugins.architectures()["qwen3"])


def test_weights_are_checked_after_the_edit(load_plugin):
    load_plugin(tryout('''
        def edit_graph(self, g):
            g.insert_after("attn_out-{L}", "attn_ls-{L}", "mul", ["attn_out-{L}", "blk.{L}.attn_scale.weight"],
                           rewire=True)
    '''))
    with pytest.raises(PorterError, match="needs tensors the checkpoint lacks: blk.{L}.attn_scale.weight"):
        spec_of(plugins.architectures()["helium"])


# -- porter generate for outside packages --------------------------------------------------------

def test_generate_keeps_outside_packages_apart(load_plugin, tmp_path):
    from porter.pipeline import GENERATED_DIR, generate

    folder = load_plugin(tryout('specs_dir = "specs"'), name="tryout_gen")
    from porter.pipeline import generation_targets

    # porter's own specs: the outside plugin is not among them (tests/parity/test_plugin_author_usage.py
    # runs the whole `porter generate --check` with an outside package installed)
    assert list(generation_targets()) == [GENERATED_DIR] and "helium" not in generation_targets()[GENERATED_DIR]
    assert list(generation_targets("tryout_gen")) == [folder / "specs"]
    problems = generate(check=True, package="tryout_gen")
    assert len(problems) == 1 and "helium.json is stale" in problems[0]
    assert generate(package="tryout_gen") == [] and generate(check=True, package="tryout_gen") == []
    assert '"plugin": "tryout_gen"' in (folder / "specs" / "helium.json").read_text()
    assert not (GENERATED_DIR / "helium.json").exists()
    r = CliRunner().invoke(main, ["generate", "--check", "--package", "tryout_gen", "-o", str(tmp_path / "elsewhere")])
    assert r.exit_code == 1 and "specs are stale" in r.output
    r = CliRunner().invoke(main, ["generate", "--package", "not_installed"])
    assert r.exit_code == 1 and "no installed plugin package 'not_installed'" in r.output


# -- porter parity --set ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--arch", "olmo", "--set", "clip_qkvv=1"], "not a field of the olmo config (did you mean clip_qkv?)"),
    (["--arch", "olmo", "--set", "clip_qkv"], "write KEY=VALUE"),
    (["some_folder", "--set", "clip_qkv=1"], "--set changes the tiny model of --arch"),
])
def test_parity_set_errors(args, message):
    r = CliRunner().invoke(main, ["parity", *args])
    assert r.exit_code == 1 and message in r.output, r.output


def test_parity_set_values_are_json_or_text():
    from porter.parity.cli import config_settings

    assert config_settings("olmo", ["clip_qkv=0.5", "hidden_act=relu2", 'rope_parameters={"rope_type": "default", '
                                  '"rope_theta": 100.0}']) == {
        "clip_qkv": 0.5, "hidden_act": "relu2", "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}
