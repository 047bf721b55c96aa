"""porter renders chat templates byte for byte as transformers' apply_chat_template does: the
bundled SmolLM2 template and templates using tools (tojson with non-ASCII and '<'), loop controls
and generation tags (before, tojson escaped them and {% break %} / {% generation %} failed)."""

from __future__ import annotations

import pytest

from porter.chat import render_chat

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo <courante> d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "ville, e.g. Zürich"}},
                   "required": ["city"]}}}]

MESSAGES = [
    {"role": "system", "content": "Réponds en français <court>."},
    {"role": "user", "content": "Quel temps fait-il à Zürich? 天气 & <b>vite</b>"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "name": "get_weather", "content": "{\"temp\": \"12°C\"}"},
    {"role": "assistant", "content": "Il fait 12 °C à Zürich.", "reasoning_content": "l'outil dit 12°C"},
    {"role": "user", "content": "Merci ✓"},
]

TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
  {%- if message.role == 'system' and tools %}{% continue %}{% endif %}
  {%- if message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson(indent=2, sort_keys=True) }}
</tool_call>{% endfor %}<|im_end|>
  {%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
  {%- else %}<|im_start|>{{ message.role }}
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}{{ message.content }}<|im_end|>
  {%- endif %}
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LOOP_TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{% break %}{% endif %}\
{% if m.role == 'system' %}{% continue %}{% endif %}[{{ loop.index }}:{{ m.role }}] {{ m.content | trim }}{{ eos_token }}
{% endfor %}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}\
({{ ns.n }} messages, {{ dict(a=1) | tojson }}, {{ messages[1] | tojson }})"""

GENERATION_TEMPLATE = """{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{% generation %}\
{{ m.content }}{{ eos_token }}{% endgeneration %}
{% else %}<|{{ m.role }}|>{{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def _smollm2_template() -> str:
    from porter.examples import gguf_metadata, smollm2_gguf

    return gguf_metadata(smollm2_gguf(), {"tokenizer.chat_template"})["tokenizer.chat_template"]


TEMPLATES = {"smollm2 (bundled)": _smollm2_template, "tools": lambda: TOOL_TEMPLATE,
             "loop controls": lambda: LOOP_TEMPLATE, "generation tags": lambda: GENERATION_TEMPLATE}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "hi"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, "<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_tools", [True, False])
def test_rendering_is_byte_identical_to_transformers(hf_tokenizer, name, add_generation_prompt, with_tools):
    template = TEMPLATES[name]()
    tools = TOOLS if with_tools else None
    messages = MESSAGES if name != "smollm2 (bundled)" else [m for m in MESSAGES if m["role"] in ("user", "system")]
    theirs = hf_tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    ours = render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                       **hf_tokenizer.special_tokens_map)
    assert ours.encode("utf-8") == theirs.encode("utf-8")
    assert "Zürich" in ours


def test_tojson_keeps_non_ascii_and_angle_brackets():
    out = render_chat("{{ messages | tojson }}", [{"role": "user", "content": "é <b>"}])
    assert out == '[{"role": "user", "content": "é <b>"}]'
