"""ancestry_of: class chains read from transformers' modular files with ast (nothing imported)."""

from __future__ import annotations

import sys

import pytest

from porter.introspect import ancestry_of
from porter.introspect.ancestry import modular_file


def test_qwen3_explicit_and_generated_classes():
    a = ancestry_of("qwen3")
    assert a["Qwen3Attention"] == ["LlamaAttention"]  # class Qwen3Attention(LlamaAttention)
    assert a["Qwen3MLP"] == ["GemmaMLP", "LlamaMLP"]
    assert a["Qwen3RMSNorm"] == ["Qwen2RMSNorm", "LlamaRMSNorm"]
    # never written in modular_qwen3.py: generated from Qwen2's, itself from Llama's
    assert a["Qwen3DecoderLayer"] == ["Qwen2DecoderLayer", "LlamaDecoderLayer"]
    assert a["Qwen3Model"][0] == "Qwen2Model" and a["Qwen3Model"][-1] == "LlamaModel"
    assert a["Qwen3ForCausalLM"] == ["Qwen2ForCausalLM", "LlamaForCausalLM"]


@pytest.mark.parametrize(
    ("model_type", "cls", "chain"),
    [
        ("mixtral", "MixtralAttention", ["MistralAttention", "LlamaAttention"]),
        ("gemma3_text", "Gemma3Attention", ["Gemma2Attention", "GemmaAttention", "LlamaAttention"]),
        ("qwen3_moe", "Qwen3MoeAttention", ["Qwen3Attention", "LlamaAttention"]),
        ("olmo2", "Olmo2DecoderLayer", ["OlmoDecoderLayer", "LlamaDecoderLayer"]),
        ("phi", "PhiMLP", ["CLIPMLP"]),
        ("data2vec-text", "Data2VecTextLayer", ["RobertaLayer", "BertLayer"]),
    ],
)
def test_chains(model_type, cls, chain):
    assert ancestry_of(model_type)[cls] == chain


def test_models_without_modular_file():
    assert modular_file("gpt2") is None
    assert ancestry_of("gpt2") == {} and ancestry_of("bert") == {} and ancestry_of("llama") == {}
    assert ancestry_of("not_a_model") == {}


def test_gemma3_text_uses_the_gemma3_folder():
    assert modular_file("gemma3_text").name == "modular_gemma3.py"


def test_nothing_is_imported():
    ancestry_of("qwen3_moe")
    assert not [name for name in sys.modules if ".modular_" in name]


def test_introspect_reports_ancestry(default_info):
    info = default_info("qwen3")
    assert info.ancestry == ancestry_of("qwen3")
    used = {cls for _, cls in info.modules}
    assert {"Qwen3Attention", "Qwen3DecoderLayer", "Qwen3RMSNorm", "Qwen3MLP"} <= used & set(info.ancestry)
