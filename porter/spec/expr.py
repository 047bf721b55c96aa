"""Values in a graph spec that refer to hyperparameters or runtime sizes.

A reference is ``"$name"`` or, inside the layer loop, ``"$name[L]"`` (the layer's entry of a
per-layer list). Sizes that are arithmetic on references are written the same way, e.g.
``"$n_tokens*4"`` or ``"($n_kv+1)//2"``: integers, references, ``+ - * //`` and parentheses,
nothing else. A spec is data: expressions are parsed by this module, never executed as Python.
"""

from __future__ import annotations

import ast
import functools
import re
from typing import Any, Callable

from porter.errors import SpecError

_TOKEN = re.compile(r"\$(\w+)(\[L\])?")
_SIMPLE = re.compile(r"^\$(\w+)(\[L\])?$")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b}


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("$", "("))  and "$" in value


def references(text: str) -> list[tuple[str, bool]]:
    """(name, per_layer) of every reference in ``text``; SpecError if it is not a valid expression."""
    _parse(text)
    return [(m.group(1), bool(m.group(2))) for m in _TOKEN.finditer(text)]


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    simple = _SIMPLE.match(text)
    if simple:
        return ("ref", simple.group(1), bool(simple.group(2)))
    names: list[tuple[str, bool]] = []

    def placeholder(m: re.Match) -> str:
        names.append((m.group(1), bool(m.group(2))))
        return f"_r{len(names) - 1}"

    source = _TOKEN.sub(placeholder, text)
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError:
        raise SpecError(f"{text!r} is not a size expression (integers, $references, + - * //, parentheses)") from None

    def check(node) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            check(node.left), check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            check(node.operand)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            pass
        elif isinstance(node, ast.Name) and re.fullmatch(r"_r\d+", node.id):
            pass
        else:
            raise SpecError(f"{text!r} is not a size expression (integers, $references, + - * //, parentheses)")

    check(tree)
    return ("expr", tree, tuple(names))


def evaluate(text: str, lookup: Callable[[str, bool], Any]) -> Any:
    """The value of a reference or size expression; ``lookup(name, per_layer)`` resolves names."""
    parsed = _parse(text)
    if parsed[0] == "ref":
        return lookup(parsed[1], parsed[2])
    _, tree, names = parsed
    values = [lookup(n, per_layer) for n, per_layer in names]

    def ev(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        return values[int(node.id[2:])]

    return ev(tree)
