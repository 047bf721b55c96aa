"""Everything porter's Python API offers says what it takes and returns: the names ``porter``
exports, and the public methods and properties of Model, ChatReply, ChatStream and the result
types the API hands back (help() shows each)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import porter
from porter.measure.bench import BenchResult
from porter.measure.perplexity import PerplexityResult
from porter.parity.harness import NodeParity, ParityReport
from porter.parity.logits import PromptParity
from porter.runtime.chat_session import ChatReply, ChatStream
from porter.runtime.generation import GenerationStats
from porter.runtime.model import Model

PUBLIC_CLASSES = [Model, ChatReply, ChatStream, GenerationStats, PerplexityResult, BenchResult, ParityReport,
                  NodeParity, PromptParity]
BUILTIN_BASES = (object, str)


def _class_doc_problem(cls) -> str | None:
    doc = inspect.cleandoc(cls.__doc__ or "")
    # a dataclass without a docstring gets its signature as one ("Name(field: type, ...)")
    if not doc or (dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(")):
        return f"{cls.__name__}: no docstring"
    return None


def _function_doc_problem(name: str, func) -> str | None:
    doc = inspect.getdoc(func) or ""
    if not doc.strip():
        return f"{name}: no docstring"
    params = [p for p in inspect.signature(func).parameters if p not in ("self", "cls")]
    unnamed = [p for p in params if not re.search(rf"\b{re.escape(p)}\b", doc)]
    return f"{name}: the docstring does not name {', '.join(unnamed)}" if unnamed else None


def undocumented(cls) -> list[str]:
    """What is missing from ``cls``: its docstring, or a public method's or property's (a method's
    docstring must name each of its parameters), over its own classes (not str's or object's)."""
    problems = [_class_doc_problem(cls)]
    seen = set()
    for klass in cls.__mro__:
        if klass in BUILTIN_BASES:
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_") or attr in seen:
                continue
            seen.add(attr)
            qualified = f"{cls.__name__}.{attr}"
            if isinstance(value, property):
                doc = inspect.getdoc(value.fget) or ""
                problems.append(None if doc.strip() else f"{qualified}: no docstring")
            elif isinstance(value, (classmethod, staticmethod)) or inspect.isfunction(value):
                problems.append(_function_doc_problem(qualified, getattr(value, "__func__", value)))
    return [p for p in problems if p]


def test_the_audit_finds_what_is_missing():
    @dataclasses.dataclass
    class Bare:
        x: int

        def method(self, amount: int) -> int:
            """Something, not naming its parameter."""
            return amount

        def plain(self):
            return 1

        @property
        def value(self):
            return 2

    assert sorted(undocumented(Bare)) == ["Bare.method: the docstring does not name amount", "Bare.plain: no docstring",
                                          "Bare.value: no docstring", "Bare: no docstring"]


def test_every_name_porter_exports_is_documented():
    assert porter.__doc__
    problems = []
    for name in porter.__all__:
        obj = getattr(porter, name)
        if callable(obj):
            problems.append(_function_doc_problem(f"porter.{name}", obj))
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_public_classes_and_their_methods_are_documented(cls):
    assert undocumented(cls) == []
