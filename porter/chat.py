"""Chat templates from checkpoints are untrusted text: render them only in Jinja's sandbox."""

from __future__ import annotations

from datetime import date

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from porter.errors import ModelError


def _raise(message: str):
    raise TemplateError(message)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as exc:
        raise ModelError(f"the model's chat template failed: {exc}") from None
