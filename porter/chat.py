"""Chat templates from checkpoints are untrusted text: render them only in Jinja's sandbox, with
the rendered text and the time bounded (a template can ask for ``'a' * 10**9``, loop for hours or
recurse), and every failure reported as one ModelError."""

from __future__ import annotations

import signal
import threading
from datetime import date

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from porter.errors import ModelError

MAX_CHARS = 1 << 20  # rendered text (a chat prompt is far shorter)
MAX_SECONDS = 5.0


def _raise(message: str):
    raise TemplateError(message)


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


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if timed:
        def alarm(*_):
            raise _Timeout

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        parts, n = [], 0
        for piece in env.from_string(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                         **extra):
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
