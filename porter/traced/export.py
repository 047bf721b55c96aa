"""Tracing a transformers causal LM with ``torch.export``.

A model is exported without a KV cache (``use_cache=False``), its sequence length symbolic where
torch allows it, and decomposed with an empty table (``run_decompositions({})``): functional ATen
that keeps the high-level ops ggml has fused kernels for (``linear``, ``embedding``,
``scaled_dot_product_attention``, ``silu``, ``gelu``, ``layer_norm``, ``softmax``...). The core
ATen table would expand attention into ``where``/``any``/``bmm`` and look like gaps that are not
there (research/torch-export-survey.md). Mixture-of-experts blocks are traced with transformers'
``batched_mm`` experts implementation (per-token expert matrices gathered by index, which is ggml's
``mul_mat_id``); the default grouped implementation hides behind an opaque custom op.

Two kinds of model are traced:

- a real-weights model (a tiny random one for parity, or a checkpoint small enough to load): every
  node's value on the example input can be computed (:meth:`Trace.evaluate`);
- a checkpoint's real configuration on the ``meta`` device (no weights at all): the graph is the
  real one, shapes included; only the weight-free nodes (masks, positions, rotary tables) can be
  evaluated, from the buffers transformers computes at initialisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from porter.errors import PorterError

log = logging.getLogger("porter.traced")

EXAMPLE_TOKENS = 13  # odd and prime: a traced size equal to it is the sequence length, nothing else


class ExportFailed(PorterError):
    """torch.export could not trace the model (the message says where and why)."""


@dataclass
class Trace:
    """An exported program and what the lowering needs to know about it."""

    program: Any  # torch.export.ExportedProgram (decomposed)
    config: Any  # the transformers config the model was built from
    model_class: str
    example: Any  # the example input ids, (1, EXAMPLE_TOKENS), on the CPU
    seq_symbols: frozenset  # sympy symbols standing for the sequence length (empty: static export)
    static: bool  # True when the sequence length was specialised to EXAMPLE_TOKENS
    meta: bool  # weights on the meta device (only weight-free nodes can be evaluated)
    buffers: dict  # buffer / constant values on the CPU, by placeholder name
    parameters: dict  # placeholder name -> state_dict name
    aliases: dict  # state_dict name -> the one name porter uses for a parameter shared under several (tied)
    parameter_values: dict = field(default_factory=dict)  # placeholder -> CPU tensor (real weights only)
    tie_groups: dict = field(default_factory=dict)  # porter's name of a tied parameter -> all its names
    max_tokens: int | None = None  # the longest sequence the exported graph holds for (torch's inferred range)
    _values: dict | None = None

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, only=None, length: int | None = None) -> dict:
        """Values of graph nodes on the example input, by node name (cached).

        With ``only`` (a set of node names) just those and what they need; with weights on the meta
        device only nodes that need no weights can be computed (others are left out). ``length``
        evaluates on an input of that many tokens instead (a dynamic export only; not cached)."""
        import torch

        if length is not None:
            values = {}
            example = self.example[:, :1].repeat(1, length)
        else:
            if self._values is None:
                self._values = {}
            values = self._values
            example = self.example
        sig = self.program.graph_signature
        user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        for node in self.program.graph.nodes:
            if node.op != "placeholder" or node.name in values:
                continue
            if node.name in user_inputs:
                values[node.name] = example
            elif node.name in self.buffers:
                values[node.name] = self.buffers[node.name]
            elif node.name in self.parameter_values:
                values[node.name] = self.parameter_values[node.name]
        wanted = None
        if only is not None:
            wanted = set()
            stack = [n for n in self.program.graph.nodes if n.name in only]
            while stack:
                n = stack.pop()
                if n.name in wanted:
                    continue
                wanted.add(n.name)
                stack.extend(n.all_input_nodes)
        for node in self.program.graph.nodes:
            if node.op != "call_function" or node.name in values or (wanted is not None and node.name not in wanted):
                continue
            if any(a.name not in values for a in node.all_input_nodes):
                continue  # needs a weight this trace does not have
            args, kwargs = _materialize(node.args, values), _materialize(node.kwargs, values)
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            try:
                with torch.no_grad():
                    values[node.name] = node.target(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a node we cannot evaluate is simply absent
                log.debug("could not evaluate %s (%s): %s", node.name, node.target, exc)
        return values


def _materialize(obj, values):
    import torch.fx

    if isinstance(obj, torch.fx.Node):
        return values[obj.name]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(o, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialize(v, values) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _quiet():
    """torch.export and transformers warn about many things a user cannot act on here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("torch._export")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def prepare_config(config):
    """The config as traced: a copy (the export itself switches the KV cache off)."""
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = False
    return config


def _causal_lm_class(config):
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        raise PorterError(f"transformers has no causal-LM class for model_type {config.model_type!r}; "
                          "porter ports text causal language models") from None


def build_model(config, *, meta: bool, seed: int = 0):
    """The causal-LM model of ``config``: random weights (``meta=False``) or weights on the meta
    device and real buffers (``meta=True``)."""
    import torch

    cls = _causal_lm_class(config)
    attn = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    with _quiet():
        if meta:
            with torch.device("meta"):
                model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
        else:
            torch.manual_seed(seed)
            model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    return model


def _use_batched_experts(model) -> None:
    """Experts as per-token gathered matrices (ggml's mul_mat_id), not the grouped kernel."""
    if hasattr(model, "_can_set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("batched_mm")


def _real_buffers(config) -> dict:
    """Buffers (rotary inv_freq, ...) as transformers computes them at initialisation, on the CPU,
    by state_dict name, without allocating weights."""
    from accelerate import init_empty_weights

    cls = _causal_lm_class(config)
    with _quiet(), init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    return {name: b for name, b in model.named_buffers() if b.device.type != "meta"}


def export_model(model, config, *, meta: bool) -> Trace:
    """torch.export ``model`` on EXAMPLE_TOKENS token ids, the sequence length symbolic if
    possible (else static)."""
    import torch

    device = "meta" if meta else "cpu"
    vocab = int(getattr(config, "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(1)
    # ids above the special tokens (pad, bos, eos usually sit at the start): a model that computes
    # positions from the ids (RoBERTa skips padding) sees an unpadded input, as porter's always is
    low = min(8, max(0, vocab - 2))
    example = torch.randint(low, max(low + 2, min(vocab, 1000)), (1, EXAMPLE_TOKENS), generator=g)
    max_len = int(getattr(config, "max_position_embeddings", 0) or 4096)
    errors = []
    program, static = None, False
    os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    _use_batched_experts(model)
    saved_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache in the trace: porter's runtime keeps its own
    try:
        program, static = _export(model, example, device, max_len, errors)
    finally:
        model.config.use_cache = saved_cache
    if program is None:
        raise ExportFailed(f"torch.export could not trace {type(model).__name__}: " + "; ".join(errors))
    return _trace(program, static, model, config, example, meta)


def _export(model, example, device, max_len, errors):
    import torch
    from transformers.exporters.utils import apply_patches

    from porter.traced.kernels import standing_in

    # the declared range first; then a range torch infers from the model's own guards (a model
    # that computes min(seq, 256) or caps a window holds for fewer tokens: recorded as max_tokens);
    # then a static graph
    attempts = [("dynamic", torch.export.Dim("seq", min=2, max=max(EXAMPLE_TOKENS + 1, max_len - 1))),
                ("inferred-range", torch.export.Dim.DYNAMIC), ("static", None)]
    for kind, dim in attempts:
        shapes = ({1: dim},) if dim is not None else None
        try:
            with _quiet(), apply_patches("dynamo"), standing_in(model), torch.no_grad():
                # a fresh input each time: an attempt may mark its input dynamic
                ep = torch.export.export(model, (example.to(device).clone(),), dynamic_shapes=shapes, strict=False)
                return ep.run_decompositions({}), dim is None
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
            errors.append(f"{kind} export: {type(exc).__name__}: {_first_line(exc)}")
    return None, False


def _trace(program, static, model, config, example, meta) -> Trace:
    symbols = set()
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in _user_inputs(program):
            dim = node.meta["val"].shape[1]
            if not isinstance(dim, int):
                symbols |= set(dim.node.expr.free_symbols)
    sig = program.graph_signature
    parameters = dict(sig.inputs_to_parameters)
    buffers = {}
    real = _real_buffers(config) if meta else {}
    state = program.state_dict
    for ph, name in sig.inputs_to_buffers.items():
        value = real.get(name) if meta else (state.get(name) if name in state else program.constants.get(name))
        if value is not None:
            buffers[ph] = value.detach().to("cpu")
    for spec in sig.input_specs:
        if spec.kind.name == "CONSTANT_TENSOR":
            value = program.constants.get(spec.target)
            if value is not None and value.device.type != "meta":
                buffers[spec.arg.name] = value.detach()
    parameter_values = {} if meta else {ph: state[name].detach() for ph, name in parameters.items() if name in state}
    max_tokens = None
    for sym, rng in getattr(program, "range_constraints", {}).items():
        if not symbols or not set(getattr(sym, "free_symbols", {sym})) <= symbols:
            continue
        try:
            upper = int(rng.upper)
        except (TypeError, ValueError, AttributeError, OverflowError):
            continue  # unbounded (torch's int_oo)
        max_tokens = upper if max_tokens is None else min(max_tokens, upper)
    return Trace(program=program, config=config, model_class=type(model).__name__, example=example,
                 seq_symbols=frozenset(symbols), static=static, meta=meta, buffers=buffers,
                 parameters=parameters, aliases=tied_aliases(model), parameter_values=parameter_values,
                 tie_groups=tie_groups(model), max_tokens=max_tokens)


def _user_inputs(program) -> set[str]:
    return {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def tied_aliases(model) -> dict:
    """state_dict name -> canonical name, for parameters shared under several names (tied
    embeddings): the canonical one is what ``named_parameters()`` lists, which is what
    ``save_pretrained`` stores."""
    first = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def tie_groups(model) -> dict:
    """porter's name of each tied parameter -> every name it goes by (the checkpoint stores one
    of them: which one is found at conversion)."""
    groups: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {names[0]: names for names in groups.values() if len(names) > 1}


def trace(config, *, meta: bool = False, seed: int = 0, model=None) -> Trace:
    """Build (unless ``model`` is given) and export the causal LM of ``config``."""
    config = prepare_config(config)
    if model is None:
        model = build_model(config, meta=meta, seed=seed)
    return export_model(model, config, meta=meta)
