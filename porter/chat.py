"""Chat templates from checkpoints are untrusted text: render them only in Jinja's sandbox, with
the rendered text and the time bounded (a template can ask for ``'a' * 10**9``, loop for hours or
recurse), and every failure reported as one ModelError.

The environment is transformers' own (its ``tojson``, ``{% generation %}``, loop controls,
``namespace``, ``raise_exception``, ``strftime_now``), rebuilt on porter's bounded sandbox class,
and the template sees the inputs transformers' ``apply_chat_template`` gives it, so the text is
byte-identical to transformers'. transformers is imported on first use (about 0.7 s).
"""

from __future__ import annotations

import signal
import threading
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from porter.errors import ModelError

MAX_CHARS = 1 << 20  # rendered text (a chat prompt is far shorter)
MAX_SECONDS = 5.0


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateError(f"exponent {right} is too large for a chat template")
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int) \
                and len(left) * right > MAX_CHARS:
            raise TemplateError(f"repeating a {len(left)}-long value {right} times exceeds {MAX_CHARS} characters")
        if operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)) \
                and len(left) + len(right) > MAX_CHARS:
            raise TemplateError(f"a value longer than {MAX_CHARS} characters")
        return super().call_binop(context, operator, left, right)


class _Timeout(Exception):
    pass


@lru_cache(maxsize=8)
def _compile(template: str):
    """transformers' environment for ``template`` (its extensions, filters and globals), on
    porter's sandbox class, which bounds what one operation may build."""
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    theirs = _cached_compile_jinja_template("").environment
    env = _Sandbox(trim_blocks=theirs.trim_blocks, lstrip_blocks=theirs.lstrip_blocks,
                   extensions=[type(e) for e in theirs.extensions.values()])
    env.filters.update(theirs.filters)
    env.globals.update(theirs.globals)
    return env.from_string(template)


def _inputs(messages, tools, documents, kwargs) -> dict:
    """What transformers' render_jinja_template hands the template: plain JSON-like copies
    (reasoning fields aliased)."""
    from transformers.utils.chat_template_utils import _alias_reasoning_fields, _plain_template_data

    chat = _plain_template_data(list(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise ModelError(f"a chat message must be a dict with 'role' and 'content', not {message!r}")
    return {**_plain_template_data(kwargs), "messages": _alias_reasoning_fields(chat),
            "tools": _plain_template_data(tools), "documents": _plain_template_data(documents)}


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, tools=None,
                documents=None, **extra) -> str:
    """Render ``messages`` as transformers' ``tokenizer.apply_chat_template(..., tokenize=False)``
    does (``extra`` carries the special tokens: bos_token, eos_token, ...), within porter's bounds."""
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if timed:
        def alarm(*_):
            raise _Timeout

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        compiled = _compile(template)
        inputs = _inputs(messages, tools, documents, extra)
        parts, n = [], 0
        for piece in compiled.generate(add_generation_prompt=add_generation_prompt, **inputs):
            n += len(piece)
            if n > MAX_CHARS:
                raise TemplateError(f"it renders more than {MAX_CHARS} characters")
            parts.append(piece)
        return "".join(parts)
    except _Timeout:
        raise ModelError(f"the model's chat template failed: it ran longer than {MAX_SECONDS:g} s; "
                         "pass a plain prompt (--no-chat) or fix the template") from None
    except (TemplateError, RecursionError, MemoryError, OverflowError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, ZeroDivisionError) as exc:
        raise ModelError(f"the model's chat template failed ({type(exc).__name__}: {exc}); pass a plain prompt "
                         "(--no-chat) or fix the template") from None
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
