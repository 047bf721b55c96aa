"""The lowering table: ATen op -> the rule that expresses it in porter's op vocabulary.

The table is closed and documented: every rule is a function registered for the ATen overloads
it handles, and its docstring's first paragraph says what it emits. An op with no rule is an op
gap. ``porter traced-ops`` (and :func:`describe`) prints the table; docs/traced-lowering.md is
its Markdown, checked by the tests.
"""

from __future__ import annotations

from typing import Callable

TABLE: dict[str, Callable] = {}


def lowers(*targets: str):
    """Register a rule for ATen overloads (``"aten.linear.default"``, ...)."""

    def register(fn: Callable) -> Callable:
        for t in targets:
            if t in TABLE:
                raise RuntimeError(f"two lowering rules for {t}: {TABLE[t].__name__} and {fn.__name__}")
            TABLE[t] = fn
        return fn

    return register


def describe() -> list[tuple[str, str]]:
    """(ATen op, what porter emits for it) for every rule, sorted by op."""
    from porter.traced import aten  # noqa: F401 - fills the table

    rows = []
    for target, fn in sorted(TABLE.items()):
        first = (fn.__doc__ or "").strip().split("\n\n")[0]  # the docstring's first paragraph
        rows.append((target, " ".join(first.split()) or fn.__name__))
    return rows
