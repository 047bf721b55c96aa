"""Chat templates are untrusted: their output and time are bounded and every failure is one
ModelError (before, `'a' * 10**9` reached the tokenizer and aborted the process; huge ranges and
recursion gave raw tracebacks)."""

from __future__ import annotations

import time

import pytest

from porter.chat import MAX_CHARS, render_chat
from porter.errors import ModelError

MESSAGES = [{"role": "user", "content": "hi"}]

BAD = {
    "huge repeat": ("{{ 'a' * 10**9 }}", r"repeating a 1-long value 1000000000 times exceeds"),
    "huge repeat reversed": ("{{ 10**9 * 'a' }}", r"exceeds"),
    "huge power": ("{{ 2 ** 100000000 }}", r"exponent 100000000 is too large"),
    "huge range": ("{% for i in range(10**9) %}x{% endfor %}", r"OverflowError: .*range"),
    "long output": ("{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}",
                    rf"renders more than {MAX_CHARS} characters"),
    "growing concatenation": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                              "{% endfor %}{{ ns.s|length }}", r"longer than"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"RecursionError"),
    "endless loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     r"ran longer than 5 s"),
    "syntax error": ("{% for %}", r"TemplateSyntaxError"),
    "raise_exception": ("{{ raise_exception('no system role') }}", r"no system role"),
    "undefined call": ("{{ nothing() }}", r"UndefinedError"),
    "division by zero": ("{{ 1 // 0 }}", r"ZeroDivisionError"),
    "sandbox escape": ("{{ ''.__class__.__mro__ }}", r"SecurityError|UndefinedError|unsafe"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_template_is_one_clear_error(case):
    template, message = BAD[case]
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"the model's chat template failed") as info:
        render_chat(template, MESSAGES)
    assert __import__("re").search(message, str(info.value)), str(info.value)
    assert time.perf_counter() - t0 < 15


def test_an_ordinary_template_renders():
    t = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    assert render_chat(t, MESSAGES) == "<|user|>hi<|assistant|>"
    assert render_chat("{{ 'ab' * 3 }}{{ 2 ** 10 }}", MESSAGES) == "ababab1024"
