"""Class ancestry read from transformers' ``modular_<name>.py`` files, without importing them.

A modular file states how an architecture differs from others: ``class Qwen3Attention(LlamaAttention)``
with ``from ..llama.modeling_llama import LlamaAttention``. transformers generates
``modeling_<name>.py`` from it, and also copies (renaming the prefix) every class the parents
need that the modular file does not define: ``Qwen3DecoderLayer`` is never written in
``modular_qwen3.py``; it is ``Qwen2DecoderLayer`` renamed, pulled in because
``Qwen3ForCausalLM(Qwen2ForCausalLM)`` needs ``Qwen2Model``, which needs ``Qwen2DecoderLayer``.

:func:`ancestry_of` parses these files with :mod:`ast` (nothing is imported), resolves both kinds
of derivation across model folders, transitively, and returns for each class of the model the
chain of classes it derives from, nearest first::

    ancestry_of("qwen3")["Qwen3Attention"]    == ["LlamaAttention"]
    ancestry_of("qwen3")["Qwen3DecoderLayer"] == ["Qwen2DecoderLayer", "LlamaDecoderLayer"]

A chain ends at a class written by hand (no modular definition) or one that derives only from
library bases (``nn.Module``, ``PreTrainedModel``...). Models without a modular file have no
ancestry.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["ancestry_of", "modular_file", "transformers_models_dir"]


@lru_cache(maxsize=1)
def transformers_models_dir() -> Path | None:
    """The installed ``transformers/models`` folder, found without importing transformers."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        models = Path(loc) / "models"
        if models.is_dir():
            return models
    return None


def _module_dir_for_model_type(model_type: str) -> str:
    """transformers' own model_type -> folder rule (gemma3_text -> gemma3, ...)."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        name = model_type_to_module_name(model_type)
    except Exception:  # pragma: no cover - transformers missing or changed
        name = model_type.replace("-", "_")
    return name.replace(".", "/")


def modular_file(model_type: str) -> Path | None:
    """Path of the modular file describing ``model_type``, or None."""
    unit = _unit_for_model_type(model_type)
    return unit.modular if unit is not None else None


# A "unit" is one (folder, stem) pair: models/qwen2 + "qwen2" -> modular_qwen2.py,
# modeling_qwen2.py, configuration_qwen2.py. data2vec has two stems in one folder.
@dataclass(frozen=True)
class _Unit:
    folder: Path
    stem: str

    @property
    def modular(self) -> Path | None:
        path = self.folder / f"modular_{self.stem}.py"
        return path if path.is_file() else None

    @property
    def files(self) -> list[Path]:
        """The unit's modeling and configuration files."""
        out = []
        for kind in ("modeling", "configuration"):
            path = self.folder / f"{kind}_{self.stem}.py"
            if path.is_file():
                out.append(path)
        return out

    @property
    def generated(self) -> list[Path]:
        """The files generated from the modular file (they carry a banner saying so)."""
        return [path for path in self.files if _is_generated(path)]


@lru_cache(maxsize=2048)
def _is_generated(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(2000)
    except OSError:
        return False
    return "automatically generated from" in head


def _unit_for_model_type(model_type: str) -> _Unit | None:
    models = transformers_models_dir()
    if models is None:
        return None
    folder = models / _module_dir_for_model_type(model_type)
    if not folder.is_dir():
        return None
    for stem in (folder.name, model_type.replace("-", "_")):
        if (folder / f"modular_{stem}.py").is_file():
            return _Unit(folder, stem)
    modulars = sorted(folder.glob("modular_*.py"))
    if len(modulars) == 1:
        return _Unit(folder, modulars[0].stem[len("modular_") :])
    return None


def _unit_for_import(module: str, level: int, here: Path) -> _Unit | None:
    """The unit a ``from <module> import ...`` statement in file ``here`` refers to, if a model."""
    models = transformers_models_dir()
    if models is None:
        return None
    if level == 2:  # from ..llama.modeling_llama import X
        parts = module.split(".") if module else []
        base = models
    elif level == 1:  # from .configuration_qwen3 import X (same folder)
        parts = module.split(".") if module else []
        base = here.parent
    elif level == 0 and module.startswith("transformers.models."):
        parts = module[len("transformers.models.") :].split(".")
        base = models
    elif level == 3 and module.startswith("models."):  # from ...models.llama.modeling_llama
        parts = module[len("models.") :].split(".")
        base = models
    else:
        return None
    if not parts:
        return None
    leaf = parts[-1]
    for prefix in ("modeling_", "configuration_", "modular_"):
        if leaf.startswith(prefix):
            return _Unit(base.joinpath(*parts[:-1]), leaf[len(prefix) :])
    return None


# A class reference: (unit defining it, class name).
_Ref = tuple[_Unit, str]


@dataclass
class _Modular:
    explicit: dict[str, tuple[_Ref, ...]] = field(default_factory=dict)  # class -> model-class bases
    generated: set[str] = field(default_factory=set)  # classes of the generated files
    prefix: str | None = None  # this model's class prefix ("Qwen3")
    pairs: list[tuple[_Ref, str]] = field(default_factory=list)  # (base, its prefix), file order


def _parse_file(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@lru_cache(maxsize=1024)
def _modular(unit: _Unit) -> _Modular:
    info = _Modular()
    for path in unit.generated:
        tree = _parse_file(path)
        if tree is not None:
            info.generated.update(n.name for n in tree.body if isinstance(n, ast.ClassDef))
    path = unit.modular
    tree = _parse_file(path) if path is not None else None
    if tree is None:
        return info
    imported: dict[str, _Ref] = {}  # local name -> model class it refers to
    module_alias: dict[str, _Unit] = {}  # `from ..llama import modeling_llama` style
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        for alias in node.names:
            local = alias.asname or alias.name
            if alias.name.startswith(("modeling_", "configuration_", "modular_")):
                sub = f"{module}.{alias.name}" if module else alias.name
                unit_ = _unit_for_import(sub, node.level, path)
                if unit_ is not None:
                    module_alias[local] = unit_
                    continue
            unit_ = _unit_for_import(module, node.level, path)
            if unit_ is not None:
                imported[local] = (unit_, alias.name)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    local_names = {n.name for n in classes}
    children: list[tuple[str, _Ref]] = []
    for node in classes:
        bases: list[_Ref] = []
        for base in node.bases:
            if isinstance(base, ast.Name):
                if base.id in local_names and base.id != node.name:
                    bases.append((unit, base.id))
                elif base.id in imported:
                    bases.append(imported[base.id])
            elif (
                isinstance(base, ast.Attribute)
                and isinstance(base.value, ast.Name)
                and base.value.id in module_alias
            ):
                bases.append((module_alias[base.value.id], base.attr))
        info.explicit[node.name] = tuple(bases)
        children.extend((node.name, ref) for ref in bases if ref[0] != unit)
    # This model's class prefix: what the classes that derive from other models share.
    if children:
        prefix = os.path.commonprefix([name for name, _ in children])
        if not prefix:
            counts: Counter[str] = Counter()
            for name, ref in children:
                n = _common_suffix(name, ref[1])
                if 0 < n < len(name):
                    counts[name[:-n]] += 1
            prefix = counts.most_common(1)[0][0] if counts else ""
        info.prefix = prefix or None
        for name, ref in children:
            suffix = name[len(prefix) :]
            if prefix and name.startswith(prefix) and suffix and ref[1].endswith(suffix):
                info.pairs.append((ref, ref[1][: len(ref[1]) - len(suffix)]))
    return info


def _walk_code(node: ast.AST):
    """ast.walk without type annotations (a type hint is not a dependency the generator copies)."""
    todo = [node]
    while todo:
        cur = todo.pop()
        yield cur
        for name, value in ast.iter_fields(cur):
            if name in ("annotation", "returns"):
                continue
            if isinstance(value, ast.AST):
                todo.append(value)
            elif isinstance(value, list):
                todo.extend(v for v in value if isinstance(v, ast.AST))


@lru_cache(maxsize=1024)
def _references(unit: _Unit) -> dict[str, frozenset[str]]:
    """class -> classes of the same unit it mentions (bases and code, not type hints)."""
    out: dict[str, frozenset[str]] = {}
    trees = [t for t in (_parse_file(p) for p in unit.files) if t is not None]
    names = {n.name for t in trees for n in t.body if isinstance(n, ast.ClassDef)}
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                used = {n.id for n in _walk_code(node) if isinstance(n, ast.Name)}
                out[node.name] = frozenset((used & names) - {node.name})
    return out


@lru_cache(maxsize=4096)
def _closure(unit: _Unit, name: str) -> frozenset[str]:
    refs = _references(unit)
    seen = {name}
    todo = [name]
    while todo:
        for dep in refs.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return frozenset(seen)


@lru_cache(maxsize=4096)
def _parent(ref: _Ref) -> _Ref | None:
    """The class ``ref`` derives from (explicitly or by generated copy), or None."""
    unit, name = ref
    info = _modular(unit)
    if name in info.explicit:
        bases = info.explicit[name]
        return bases[0] if bases else None
    if name not in info.generated or not info.prefix or not name.startswith(info.prefix):
        return None
    # A class the modular file never wrote: the generator copied it from the parent whose
    # classes need it, renaming the prefix.
    suffix = name[len(info.prefix) :]
    for base, base_prefix in info.pairs:
        candidate = base_prefix + suffix
        if candidate != base[1] and candidate in _closure(base[0], base[1]):
            return (base[0], candidate)
    return None


def _chain(ref: _Ref) -> list[str]:
    out: list[str] = []
    seen = {ref}
    current: _Ref | None = _parent(ref)
    while current is not None and current not in seen:
        seen.add(current)
        out.append(current[1])
        current = _parent(current)
    return out


@lru_cache(maxsize=256)
def _ancestry_cached(model_type: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    unit = _unit_for_model_type(model_type)
    if unit is None:
        return ()
    info = _modular(unit)
    names = list(info.explicit) + sorted(info.generated - set(info.explicit))
    result = []
    for name in names:
        chain = _chain((unit, name))
        if chain:
            result.append((name, tuple(chain)))
    return tuple(result)


def ancestry_of(model_type: str) -> dict[str, list[str]]:
    """Class name -> chain of classes it derives from, per transformers' modular files.

    Covers classes the modular file defines and those the generator copied from a parent
    (renamed). Empty when the model has no modular file (GPT-2, BERT...).
    """
    return {name: list(chain) for name, chain in _ancestry_cached(model_type)}
