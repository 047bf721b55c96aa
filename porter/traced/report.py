"""The op-gap report: what the traced path cannot lower, where, and what to do about it."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field


@dataclass
class GapEntry:
    op: str  # the ATen op (or pattern) that has no lowering
    reason: str
    module: str  # transformers module path of the first node
    module_class: str
    count: int = 1
    nodes: list[str] = field(default_factory=list)


@dataclass
class GapReport:
    model_type: str
    entries: list[GapEntry]
    nearest_plugin: str | None = None
    ancestry: list[str] = field(default_factory=list)

    @classmethod
    def from_gaps(cls, model_type: str, gaps, trace=None) -> GapReport:
        from porter.traced.lower import module_class, module_path

        grouped: OrderedDict = OrderedDict()
        for g in gaps:
            node = g.node
            path = module_path(node) if node is not None else ""
            key = (g.op, g.reason, _layer_free(path))
            e = grouped.get(key)
            if e is None:
                grouped[key] = GapEntry(g.op, g.reason, path, module_class(node) if node is not None else "",
                                        1, [node.name] if node is not None else [])
            else:
                e.count += 1
                if node is not None:
                    e.nodes.append(node.name)
        if not grouped:
            grouped[("?", "", "")] = GapEntry("?", "the traced graph produced no logits", "", "")
        report = cls(model_type, list(grouped.values()))
        report.nearest_plugin, report.ancestry = nearest_plugin(model_type)
        return report

    @classmethod
    def export_failed(cls, model_type: str, message: str) -> GapReport:
        report = cls(model_type, [GapEntry("torch.export", message, "", "")])
        report.nearest_plugin, report.ancestry = nearest_plugin(model_type)
        return report

    @property
    def first_line(self) -> str:
        e = self.entries[0]
        where = f" in {e.module} ({e.module_class})" if e.module else ""
        return f"{e.op}: {e.reason}{where}"

    def summary(self) -> str:
        lines = [f"{self.model_type}: the traced graph cannot be lowered to porter's ops "
                 f"({len(self.entries)} gap{'s' if len(self.entries) != 1 else ''}):"]
        for e in self.entries:
            where = f" at {e.module} ({e.module_class})" if e.module else ""
            lines.append(f"  - {e.op} x{e.count}: {e.reason}{where}")
        if self.nearest_plugin:
            lines.append(f"nearest declared plugin by modular ancestry: {self.nearest_plugin} "
                         f"(ancestry: {' -> '.join(self.ancestry)})")
        lines.append("a plugin can port it by hand (see the README's plugin guide), or a lowering rule in "
                     "porter/traced/aten.py can add the op")
        return "\n".join(lines)

    def rich_table(self):
        from rich.table import Table

        table = Table(title=f"op gaps of {self.model_type}")
        for col in ("ATen op", "count", "module", "module class", "why"):
            table.add_column(col)
        for e in self.entries:
            table.add_row(e.op, str(e.count), e.module or "-", e.module_class or "-", e.reason)
        return table

    def as_dict(self) -> dict:
        return {"model_type": self.model_type, "nearest_plugin": self.nearest_plugin, "ancestry": self.ancestry,
                "gaps": [asdict(e) for e in self.entries]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)


def _layer_free(path: str) -> str:
    import re

    return re.sub(r"\.\d+(\.|$)", r".{L}\1", path)


def nearest_plugin(model_type: str) -> tuple[str | None, list[str]]:
    """The first model type with a declared plugin along ``model_type``'s modular ancestry
    (transformers' ``modular_*.py``: olmo3's causal LM derives from olmo2's, olmo's, llama's),
    and that ancestry as model types."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        from porter.introspect.ancestry import ancestry_of
        from porter.plugins import architectures

        chain = ancestry_of(model_type)
    except Exception:  # noqa: BLE001 - ancestry is a hint, never a failure
        return None, []
    by_class = {cls: mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    lm = next((chain[c] for c in chain if c.endswith("ForCausalLM")), None)
    if lm is None:
        layer = next((chain[c] for c in chain if c.endswith("DecoderLayer")), [])
        lm = [c.replace("DecoderLayer", "ForCausalLM") for c in layer]
    types = [by_class[c] for c in lm if c in by_class]
    known = architectures()
    return next((t for t in types if t in known), None), [model_type] + types
