"""Where each parameter of a traced model comes from in its checkpoint.

transformers 5 loads some checkpoints through a conversion: keys renamed (GPT-NeoX's
``embed_out`` is the model's ``lm_head``), or several tensors merged into one (Mixtral's
per-expert ``experts.{E}.w1/w3`` become one ``experts.gate_up_proj``). A traced graph uses the
model's own names, so porter asks transformers' conversion mapping for each checkpoint key's
target and, for merged tensors, runs transformers' own conversion operations on the sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from porter.errors import ModelError


@dataclass
class Source:
    keys: list[str]  # checkpoint keys, in the order the conversion takes them
    converter: object = None  # transformers WeightConverter, or None for a plain (renamed) tensor
    patterns: list[str] = field(default_factory=list)  # the converter source pattern of each key

    def transform(self):
        """A TensorPlan transform producing the model's tensor from the sources (None: as stored)."""
        if self.converter is None:
            return None
        converter, patterns = self.converter, list(self.patterns)

        def run(arrays: list[np.ndarray]) -> np.ndarray:
            import torch

            inputs: dict[str, list] = {p: [] for p in converter.source_patterns if p in patterns}
            for pattern, array in zip(patterns, arrays):
                inputs[pattern].append(torch.from_numpy(np.ascontiguousarray(array)))
            out = inputs
            with torch.no_grad():
                for op in converter.operations:
                    out = op.convert(out, source_patterns=converter.source_patterns,
                                     target_patterns=converter.target_patterns)
            if len(out) != 1:
                raise ModelError(f"transformers' conversion {converter.operations} makes {len(out)} tensors "
                                 "from one group; porter handles many-to-one conversions only")
            value = next(iter(out.values()))
            if isinstance(value, list):
                value = value[0]
            return value.detach().to(torch.float32).numpy()

        return run


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def checkpoint_sources(model, names: list[str]) -> dict[str, Source]:
    """Model parameter name -> its :class:`Source` among checkpoint keys ``names``, using the
    conversion mapping transformers applies when loading ``model`` (a meta-device instance)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are the model's
        return {n: Source([n]) for n in names}
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    state = model.state_dict()
    out: dict[str, Source] = {}
    groups: dict[str, tuple] = {}
    for key in sorted(names, key=_natural):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if pattern is None:
            out.setdefault(target, Source([key]))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        entry = groups.setdefault(target, (conv, [], []))
        entry[1].append(key)
        entry[2].append(pattern)
    for target, (conv, keys, patterns) in groups.items():
        order = {p: i for i, p in enumerate(conv.source_patterns)}
        ranked = sorted(zip(keys, patterns), key=lambda kp: (order[kp[1]], _natural(kp[0])))
        out[target] = Source([k for k, _ in ranked], conv, [p for _, p in ranked])
    return out
