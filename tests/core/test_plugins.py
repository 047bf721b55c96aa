"""The plugin manager: built-ins load through entry points; bad hook implementations are rejected."""

from __future__ import annotations

import types

import pluggy
import pytest
from click.testing import CliRunner

from porter import hookspecs
from porter.cli import main
from porter.plugins import architectures, hookimpl


def test_builtin_plugins_claim_their_model_types():
    archs = architectures()
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(archs)
    for model_type, cls in archs.items():
        assert cls.model_type == model_type
        assert cls.gguf_arch and cls.family


def test_variants_state_only_the_difference():
    archs = architectures()
    assert issubclass(archs["mistral"], archs["llama"])
    assert issubclass(archs["qwen3"], archs["qwen2"])


def test_unknown_hook_implementation_is_rejected():
    pm = pluggy.PluginManager("porter")
    pm.add_hookspecs(hookspecs)
    bogus = types.ModuleType("bogus_plugin")

    @hookimpl
    def porter_architecturez():  # a typo: no such hook
        return []

    bogus.porter_architecturez = porter_architecturez
    pm.register(bogus)
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_cli_lists_plugins_and_versions():
    r = CliRunner().invoke(main, ["plugins"])
    assert r.exit_code == 0, r.output
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        assert model_type in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    from porter.runtime._lib import EXPECTED_GGML_VERSION

    assert "porter 0.1.0" in r.output and f"ggml {EXPECTED_GGML_VERSION}" in r.output
    assert "native build" in r.output or "portable build" in r.output  # which build runs
    assert "CPU: " in r.output and ("AVX" in r.output or "NEON" in r.output)  # what the ggml build uses
    assert "huge pages for weights and KV cache: " in r.output  # porter.runtime.hugepages: on or off, and why


def test_generated_specs_are_current(tmp_path):
    from porter.pipeline import GENERATED_DIR, generate

    assert generate(GENERATED_DIR, check=True) == []
    # a stale copy is detected
    for p in GENERATED_DIR.glob("*.json"):
        (tmp_path / p.name).write_text(p.read_text())
    victim = tmp_path / "llama.json"
    victim.write_text(victim.read_text().replace('"rms_norm"', '"norm"', 1))
    problems = generate(tmp_path, check=True)
    assert len(problems) == 1 and "llama.json is stale" in problems[0]
