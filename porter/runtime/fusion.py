"""Matrices that multiply the same input, multiplied as one.

Within a layer, q, k and v (and a gated MLP's gate and up) are products of one input with three
(two) weights. When those weights lie next to each other in one buffer (porter writes each
layer's tensors in table order, and the loader keeps the file's order in the buffers it fills),
together they are one matrix with their rows stacked, ggml's ``ne`` [n_in, rows_q + rows_k +
rows_v], and one ``mul_mat`` computes what the three do: the same dot products, bit for bit. The
input is quantized once instead of three times, the threads meet at one barrier instead of three,
and the product has more rows to share between them. Each member's output is then a view of its
rows of the product (llama.cpp does the same with the fused ``attn_qkv`` tensors some files have).

No bytes are copied: the stacked matrix is a new tensor header over the members' memory. Groups
are fused only when everything that reads a member's view accepts a strided tensor (the ops in
``_STRIDED_READERS``, through reshapes and permutes), so an op that needs dense rows never sees one;
a reshape that a strided view cannot express raises ShapeError while the graph is built, and the
model then unstacks its products (:meth:`FusedWeights.unstack`) and builds it as the spec writes it.
"""

from __future__ import annotations

from porter.runtime._lib import ffi, lib
from porter.runtime.core import Context, cpu_buffer

# ops that read a [features, tokens] view with strided rows correctly (ggml reads them through
# nb[1..3]); reshape and permute pass the view on (a reshape of a strided view is itself a view:
# porter.runtime.ops.Ops.reshape), so their readers are checked in turn
_STRIDED_READERS = {"rope", "rms_norm", "norm", "l2_norm", "add", "sub", "mul", "div", "mul_mat", "flash_attn",
                    "silu", "get_rows"}
# kv_store returns its input itself when a pass runs without the cache
_PASS_ON = {"reshape", "permute", "kv_store"}


class FusedMatmul:
    """One product standing for several: ``weight`` (the members' stacked matrix) times ``x``;
    ``members``: the steps it replaces, each reading rows [offset, offset + ne1) of the product."""

    __slots__ = ("label", "members", "name", "select", "weight", "x")

    def __init__(self, name: str, weight, x: str, members: list, select: tuple[int, ...]):
        self.name, self.weight, self.x, self.members, self.select = name, weight, x, members, select
        self.label = name.encode()[:63]


def _stackable(ws: list) -> bool:
    """Whether matrices ``ws`` (in memory order) form one matrix of their rows stacked."""
    first = ws[0]
    for w in ws:
        if (w == ffi.NULL or w.buffer == ffi.NULL or w.view_src != ffi.NULL or w.ne[2] != 1 or w.ne[3] != 1
                or w.type != first.type or w.ne[0] != first.ne[0] or w.buffer != first.buffer
                or w.extra != first.extra or not lib.ggml_is_contiguous(w)):
            return False
    for a, b in zip(ws, ws[1:]):
        if int(ffi.cast("uintptr_t", a.data)) + lib.ggml_nbytes(a) != int(ffi.cast("uintptr_t", b.data)):
            return False
    return cpu_buffer(first.buffer)  # the CPU's own buffers: mapped, copied, repacked


def _strided_ok(name: str, by_name: dict, readers: dict[str, set[str]], depth: int = 0) -> bool:
    """Whether everything that reads ``name`` (through reshapes and permutes) takes strided rows."""
    who = readers.get(name, set())
    if not who or depth > 8:
        return False
    for r in who:
        s = by_name.get(r)
        if s is None or s.on is not True:  # a spec output, or a switch resolved at run time
            return False
        if s.op in _PASS_ON:
            if not _strided_ok(r, by_name, readers, depth + 1):
                return False
        elif s.op not in _STRIDED_READERS:
            return False
    return True


class FusedWeights:
    """Finds the fusable products of a plan's steps, marks them (``Step.part``) and holds the
    stacked matrices' headers (close it with the model)."""

    def __init__(self, steps: list, weights: dict, readers: dict[str, set[str]]):
        self.groups: list[FusedMatmul] = []
        self.found = 0
        self.ctx: Context | None = None
        candidates = self._candidates(steps, weights, readers)
        if not candidates:
            return
        self.ctx = Context(len(candidates))
        for members in candidates:
            ws = [weights[s.inputs[0]] for s in members]
            rows = sum(int(w.ne[1]) for w in ws)
            name = "+".join(s.name for s in members)
            t = self.ctx.new_tensor(ws[0].type, [int(ws[0].ne[0]), rows], name)
            placed = lib.ggml_backend_tensor_alloc(ws[0].buffer, t, ws[0].data) == lib.GGML_STATUS_SUCCESS
            if not placed or t.extra != ws[0].extra:
                continue  # ggml would hold the stacked matrix in another layout than its parts
            group = FusedMatmul(name, t, members[0].inputs[1], members, members[0].select)
            offset = 0
            for s, w in zip(members, ws):
                s.part = (group, offset)
                offset += int(w.ne[1])
            self.groups.append(group)
        self.found = len(self.groups)  # before any unstack()

    @staticmethod
    def _candidates(steps: list, weights: dict, readers: dict[str, set[str]]) -> list[list]:
        by_name = {s.name: s for s in steps}
        by_input: dict[tuple, list] = {}
        for s in steps:
            if (s.op == "mul_mat" and s.on is True and len(s.inputs) == 2 and s.inputs[0] in weights
                    and s.inputs[1] not in weights and isinstance(weights[s.inputs[0]], ffi.CData)):
                by_input.setdefault((s.inputs[1], s.layer, s.select), []).append(s)
        out = []
        for group in by_input.values():
            ok = [s for s in group if _strided_ok(s.name, by_name, readers)]
            ok.sort(key=lambda s: int(ffi.cast("uintptr_t", weights[s.inputs[0]].data)))
            run: list = []  # maximal runs of neighbours in memory
            for s in ok:
                if run and not _stackable([weights[r.inputs[0]] for r in run + [s]]):
                    if len(run) > 1:
                        out.append(run)
                    run = []
                run.append(s)
            if len(run) > 1:
                out.append(run)
        return out

    def unstack(self) -> None:
        """Compute every product on its own again."""
        for group in self.groups:
            for s in group.members:
                s.part = None
        self.groups = []

    def close(self) -> None:
        self.unstack()
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
