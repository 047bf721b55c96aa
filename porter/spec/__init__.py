"""The graph spec: a versioned, validated, serializable description of a model's ggml graph.

A spec is JSON. Its parts:

- ``hparams``: named values (numbers, strings, booleans, per-layer lists) that node attributes
  refer to as ``"$name"`` or, inside the layer loop, ``"$name[L]"``; sizes may be arithmetic on
  references and runtime sizes, e.g. ``"$n_tokens*4"`` (:mod:`porter.spec.expr`).
- ``inputs``: the runtime inputs the graph reads, from a closed set of kinds (:data:`INPUT_KINDS`).
- ``weights``: every weight tensor (GGUF name, ``{L}`` standing for the layer index) and its shape.
- ``graph``: nodes in order, and at most one ``repeat`` block (the layer loop) whose body is
  instantiated ``hparams[count]`` times with ``{L}`` in names; ``$carry`` in the body is the
  loop-carried tensor (``init`` for layer 0, the previous layer's ``result`` after that, and the
  last layer's ``result`` after the loop).
- ``outputs``: node names the runtime reads back (``result_output`` is the logits).

Every node has a stable name (``attn_norm-3``), an op from the closed vocabulary :data:`OPS`,
named inputs (earlier nodes, graph inputs, or weights) and attributes. A node may carry ``hf``,
the transformers module whose output it corresponds to (parity compares them), and ``when``, a
per-layer boolean: where false the node passes its first input through unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from porter.errors import SpecError
from porter.spec import expr

SPEC_FORMAT = "porter-graph-spec"
SPEC_VERSION = 2
# Versions this porter reads: 1 (declared plugins' specs) and 2 (adds size expressions, the ops
# the traced path needs, per-layer cache widths and specs without a layer loop).
READABLE_VERSIONS = (1, 2)

# op -> (min inputs, max inputs, required attributes, optional attributes)
OPS: dict[str, tuple[int, int, frozenset[str], frozenset[str]]] = {}


def _op(name: str, n_min: int, n_max: int | None = None, req: str = "", opt: str = "") -> None:
    OPS[name] = (n_min, n_min if n_max is None else n_max, frozenset(req.split()), frozenset(opt.split()))


for _unary in ("silu", "gelu_erf", "gelu_tanh", "relu", "sigmoid", "tanh", "exp", "sqr", "sqrt",
               "cont", "transpose", "sum_rows", "neg", "abs", "cos", "sin", "log", "recip", "softplus",
               "gelu_quick", "elu", "step", "cumsum", "expm1", "floor", "ceil", "round", "trunc"):
    _op(_unary, 1)
for _binary in ("add", "sub", "mul", "div", "mul_mat", "get_rows"):
    _op(_binary, 2)
_op("mul_mat_id", 3)
_op("scale", 1, req="s", opt="bias")
_op("softcap", 1, req="cap")
_op("relu2", 1)  # relu(x)^2 (Arcee, Nemotron: hidden_act "relu2")
_op("rms_norm", 1, req="eps")
_op("norm", 1, req="eps")
_op("l2_norm", 1, req="eps")
_op("rope", 2, 3, req="n_dims mode freq_base",
    opt="freq_scale ext_factor attn_factor beta_fast beta_slow n_ctx_orig")
_op("soft_max", 1, 2, opt="scale max_bias")
_op("flash_attn", 3, 4, req="scale", opt="max_bias softcap")
_op("reshape", 1, req="shape")
_op("slice", 1, req="start length", opt="dim step")  # a window along ne[dim] (default 0): [start, start + length), every step-th
_op("clamp", 1, req="min max")
_op("repeat", 1, req="shape")  # tile to a shape whose every dimension is a multiple of the input's
_op("pad", 1, req="pads")  # zeros before/after along each ne dimension: [before0, after0, before1, ...]
_op("fill", 1, req="value")  # a tensor of the input's shape filled with a constant
_op("permute", 1, req="axes")
_op("concat", 2, req="dim")
_op("cast", 1, req="type")
_op("argsort", 1, opt="descending")
_op("argmax", 1)  # I32 index of the largest element of each row (ne[0]) of a matrix
_op("top_k", 1, req="k")
_op("kv_store", 1, req="cache", opt="layer")  # write into the layer's K or V cache, return all cached rows
# recurrent state: prepend the layer's last `rows` rows (zeros at the start), keep the new last ones
_op("state_store", 1, req="cache rows", opt="layer")
_op("delta_net", 5, req="cache", opt="layer")  # gated delta rule q, k, v, g, beta on the layer's recurrent memory
_op("ssm_scan", 5, req="cache", opt="layer")  # Mamba-2 selective scan x, dt, A, B, C on the layer's recurrent state
_op("ssm_conv", 2)  # depthwise causal convolution: sx ne [R + n, C], taps ne [R + 1, C] -> ne [C, n]
_op("mean_pool", 1)  # mean over tokens (encoder pooling)

# Runtime inputs a graph may read; the runtime knows how to fill each kind.
INPUT_KINDS = {
    "tokens": "I32 [n_tokens] token ids",
    "positions": "I32 [n_tokens] absolute positions",
    "token_types": "I32 [n_tokens] segment ids (encoders)",
    "kq_mask": "F16 [n_kv, n_tokens] additive attention mask (causal, or padding-only for encoders)",
    "kq_mask_swa": "F16 [n_kv, n_tokens] causal mask limited to the sliding window",
    "kq_mask_alibi": "F32 [n_kv, n_tokens, n_head] causal mask plus the per-head ALiBi bias "
                     "(hparams alibi_slopes, alibi_bf16: transformers rounds slope * position to bfloat16; "
                     "alibi_scale, else 1/sqrt(head_dim))",
    "out_ids": "I32 [n_out] rows whose logits are needed",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Node(_Strict):
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = Field(default_factory=dict)
    hf: str | None = None
    when: str | None = None


class Repeat(_Strict):
    repeat: str  # hparam holding the count
    init: str  # tensor carried into layer 0
    result: str  # node name pattern carried out of each layer
    body: list[Node]


class InputDecl(_Strict):
    name: str
    kind: str


class WeightDecl(_Strict):
    name: str
    shape: list[Union[int, str]]  # numpy order; "$hparam" allowed
    layered: bool = False  # name contains {L}: one tensor per layer
    layers: list[int] | None = None  # a layered weight only these layers have (the others skip its nodes)
    data: list[float] | None = None  # an F32 constant carried in the spec itself, not in the GGUF


class Spec(_Strict):
    format: Literal["porter-graph-spec"] = SPEC_FORMAT
    version: int
    architecture: str
    produced_by: dict[str, str] = Field(default_factory=dict)
    causal: bool = True
    hparams: dict[str, Any]
    inputs: list[InputDecl]
    weights: list[WeightDecl]
    graph: list[Union[Node, Repeat]]
    outputs: list[str]

    # -- serialization ---------------------------------------------------------------------------
    def to_json(self) -> str:
        """Canonical text: one line per node, weight and input, so diffs read node by node."""
        data = self.model_dump(exclude_none=True)
        one = lambda x: json.dumps(x, separators=(", ", ": "))  # noqa: E731
        lines = ["{"]
        for key in ("format", "version", "architecture", "produced_by", "causal", "hparams"):
            lines.append(f' "{key}": {json.dumps(data[key], indent=2).replace(chr(10), chr(10) + " ") if key in ("produced_by", "hparams") else one(data[key])},')
        for key in ("inputs", "weights"):
            lines.append(f' "{key}": [\n' + ",\n".join("  " + one(x) for x in data[key]) + "\n ],")
        items = []
        for item in data["graph"]:
            if "repeat" in item:
                head = {k: v for k, v in item.items() if k != "body"}
                body = ",\n".join("    " + one(n) for n in item["body"])
                items.append("  " + one(head)[:-1] + ', "body": [\n' + body + "\n  ]}")
            else:
                items.append("  " + one(item))
        lines.append(' "graph": [\n' + ",\n".join(items) + "\n ],")
        lines.append(f' "outputs": {one(data["outputs"])}')
        lines.append("}")
        return "\n".join(lines) + "\n"

    @property
    def layer_loop(self) -> Repeat | None:
        return next((g for g in self.graph if isinstance(g, Repeat)), None)

    def weight_names(self) -> list[str]:
        """Concrete names of the weights the GGUF holds (layer patterns expanded)."""
        n_layer = int(self.hparams.get(self.layer_loop.repeat, 0)) if self.layer_loop else 0
        names = []
        for w in self.weights:
            if w.data is not None:
                continue
            if w.layered:
                names.extend(w.name.format(L=i) for i in (w.layers if w.layers is not None else range(n_layer)))
            else:
                names.append(w.name)
        return names


def check(spec: Spec) -> Spec:
    """Semantic validation beyond the schema: ops, attributes, references, names."""
    problems: list[str] = []
    inputs = {i.name for i in spec.inputs}
    for i in spec.inputs:
        if i.kind not in INPUT_KINDS:
            problems.append(f"input {i.name!r} has unknown kind {i.kind!r} (known: {', '.join(INPUT_KINDS)})")
    weights = {w.name for w in spec.weights}
    for w in spec.weights:
        if w.data is not None and not (all(isinstance(d, int) and d > 0 for d in w.shape) and len(w.shape) <= 4
                                       and math.prod(w.shape) == len(w.data)):
            problems.append(f"constant weight {w.name!r}: shape {w.shape} does not hold its {len(w.data)} values")
    defined: set[str] = set()
    loops = [g for g in spec.graph if isinstance(g, Repeat)]
    if len(loops) > 1:
        problems.append("a spec has at most one repeat block (the layer loop)")

    def check_ref_value(where: str, value: Any, in_loop: bool) -> None:
        if isinstance(value, list):
            for v in value:
                check_ref_value(where, v, in_loop)
        elif expr.is_reference(value):
            try:
                refs = expr.references(value)
            except SpecError as exc:
                problems.append(f"{where}: {exc}")
                return
            for name, per_layer in refs:
                if name not in spec.hparams and name not in RUNTIME_SYMBOLS:
                    problems.append(f"{where}: {value!r} names no hparam ({name})")
                elif per_layer and not in_loop:
                    problems.append(f"{where}: {value!r} indexes by layer outside the layer loop")
                elif per_layer and not isinstance(spec.hparams.get(name), list):
                    problems.append(f"{where}: {value!r} indexes an hparam that is not a per-layer list")

    def check_node(node: Node, in_loop: bool, local: set[str]) -> None:
        where = f"node {node.name!r}"
        if node.op not in OPS:
            problems.append(f"{where}: op {node.op!r} is not in porter's op vocabulary")
            return
        n_min, n_max, req, opt = OPS[node.op]
        if not n_min <= len(node.inputs) <= n_max:
            problems.append(f"{where}: {node.op} takes {n_min}..{n_max} inputs, got {len(node.inputs)}")
        missing = req - node.attrs.keys()
        unknown = node.attrs.keys() - req - opt
        if missing:
            problems.append(f"{where}: {node.op} needs attributes {sorted(missing)}")
        if unknown:
            problems.append(f"{where}: {node.op} has unknown attributes {sorted(unknown)}")
        for src in node.inputs:
            if src == "$carry":
                if not in_loop and "$carry" not in defined:
                    problems.append(f"{where}: $carry used before the layer loop")
                continue
            if src.startswith("$"):  # an input chosen per layer through an hparam list
                check_ref_value(f"{where} input", src, in_loop)
                continue
            if src not in defined and src not in local and src not in inputs and src not in weights:
                problems.append(f"{where}: input {src!r} is not an earlier node, a graph input or a weight")
        for key, value in node.attrs.items():
            check_ref_value(f"{where} attribute {key}", value, in_loop)
        if node.when is not None:
            check_ref_value(f"{where} when", node.when, in_loop)
        name_set = local if in_loop else defined
        if node.name in name_set or node.name in defined:
            problems.append(f"{where}: duplicate node name")
        if in_loop and "{L}" not in node.name:
            problems.append(f"{where}: node names in the layer loop must contain {{L}}")
        name_set.add(node.name)

    for item in spec.graph:
        if isinstance(item, Node):
            check_node(item, False, defined)
        else:
            if item.repeat not in spec.hparams:
                problems.append(f"repeat count {item.repeat!r} is not an hparam")
            if item.init not in defined and item.init not in inputs:
                problems.append(f"repeat init {item.init!r} is not an earlier node")
            local: set[str] = set()
            for node in item.body:
                check_node(node, True, local)
            if item.result not in local:
                problems.append(f"repeat result {item.result!r} is not a node of the loop body")
            defined.update(local)
            defined.add("$carry")
    if not spec.outputs:
        problems.append("the graph has no outputs (list the node names the runtime reads back, e.g. result_output)")
    for out in spec.outputs:
        if out not in defined:
            problems.append(f"output {out!r} is not a node")
    if problems:
        raise SpecError("invalid graph spec:\n  - " + "\n  - ".join(problems))
    return spec


RUNTIME_SYMBOLS = {"n_tokens", "n_kv", "n_out"}


def loads(text: str) -> Spec:
    """Parse and validate a spec from JSON text (a clear SpecError on any problem)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"graph spec is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SPEC_FORMAT:
        raise SpecError(f"not a porter graph spec (expected \"format\": \"{SPEC_FORMAT}\")")
    version = data.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:  # True == 1 in Python
        raise SpecError(
            f"graph spec version {version!r} is not supported by this porter (it reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); regenerate the spec or convert the model again with this porter"
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_validation_message(exc)) from None
    return check(spec)


def _validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: where, what, and what to do."""
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(part) for part in err["loc"]) or "the spec"
        problems.append(f"{where}: {err['msg']}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return (f"invalid graph spec: {'; '.join(problems)}{more}; the spec is damaged or was written by another "
            "tool: convert the model again (or regenerate a plugin's spec with `porter generate`)")


def load(path: str | Path) -> Spec:
    return loads(Path(path).read_text())
