"""A model split by layers across the local CPU backend and remote ggml RPC servers, run
through ggml's backend scheduler (``ggml_backend_sched``).

Placement, as llama.cpp places layers across devices: the layer loop is cut into contiguous
runs, one per device (the local CPU first, then the servers in the order given), as equal as
the layer count allows; each layer's weights and its KV cache live on its device. Weights
outside the loop (token embeddings, output norm and head) stay local, where the graph's inputs
are. ggml's scheduler then runs every op where its weights (or the cache it writes) live,
copying activations across at the boundaries.

Only this path differs from the plain CPU one (:class:`porter.runtime.core.Backend` with
gallocr); the model code sees the same backend interface (``buffer_type``, ``compute``,
``n_threads``, ``threads_in_use``, ``close``) plus :meth:`SplitBackend.allocate`.
"""

from __future__ import annotations

import re

from porter.errors import ModelError
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Backend, Buffer, Context, _track
from porter.runtime.devices import (_require_rpc, check_reachable, exit_cleanly_on_abort, mark_connected,
                                    release_abort_guard)
from porter.runtime.graph import KVCache, cache_names, cache_widths, kv_cache_bytes, state_names, state_widths

GRAPH_SIZE = 32768  # nodes the scheduler can place (porter's graphs use 64 per layer + a few hundred)
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


class RemoteDevice:
    """One RPC server: its ggml device and a backend on it (ggml keeps the connection)."""

    def __init__(self, owner, endpoint: str):
        self.endpoint = endpoint
        reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
        if reg == ffi.NULL or lib.ggml_backend_reg_dev_count(reg) < 1:
            raise ModelError(f"the RPC server at {endpoint} reports no device")
        self.device = lib.ggml_backend_reg_dev_get(reg, 0)
        self.ptr = lib.ggml_backend_dev_init(self.device, ffi.NULL)
        if self.ptr == ffi.NULL:
            raise ModelError(f"ggml could not start a backend on the RPC server at {endpoint}")
        self._finalizer = _track(owner, "backend", lib.ggml_backend_free, self.ptr)
        self.buffer_type = lib.ggml_backend_get_default_buffer_type(self.ptr)

    def close(self) -> None:
        self._finalizer()


def split_layers(n_layer: int, n_devices: int) -> list[int]:
    """The device of each layer: contiguous runs, sizes differing by at most one, earlier devices
    taking the remainder."""
    base, extra = divmod(n_layer, n_devices)
    owners = []
    for device in range(n_devices):
        owners += [device] * (base + (device < extra))
    return owners


class SplitBackend:
    """The local CPU backend (with porter's threadpool) plus RPC servers, under one scheduler."""

    kv_cache_type = None  # SplitKVCache, set below

    def __init__(self, endpoints: list[str], n_threads: int | None = None):
        _require_rpc()
        check_reachable(endpoints)  # before ggml connects: it would abort on failure
        exit_cleanly_on_abort(endpoints)
        self._guarded = True
        self.cpu = Backend(n_threads)
        self.remotes = []
        for endpoint in endpoints:
            self.remotes.append(RemoteDevice(self, endpoint))
            mark_connected(endpoint)
        self.endpoints = list(endpoints)
        self._owned: list = []  # weight buffers and contexts this backend's devices hold
        self._layer_device: list[int] = []
        self._last_allocated = None
        # the scheduler wants the CPU backend last (graph inputs live there); earlier = preferred
        ptrs = [r.ptr for r in self.remotes] + [self.cpu.ptr]
        self._backends = ffi.new("ggml_backend_t[]", ptrs)
        self.sched = lib.ggml_backend_sched_new(self._backends, ffi.NULL, len(ptrs), GRAPH_SIZE, False, False)
        if self.sched == ffi.NULL:
            raise MemoryError("ggml could not create the backend scheduler")
        self._sched_finalizer = _track(self, "sched", lib.ggml_backend_sched_free, self.sched)

    # -- the Backend interface the model uses ---------------------------------------------------
    @property
    def buffer_type(self):
        return self.cpu.buffer_type

    @property
    def n_threads(self) -> int:
        return self.cpu.n_threads

    @property
    def threads_in_use(self) -> int:
        return self.cpu.threads_in_use

    def set_threads(self, n: int) -> None:
        self.cpu.set_threads(n)

    def compute(self, graph) -> None:
        self.cpu.follow_policy()  # the local CPU's thread policy, as Backend.compute
        status = lib.ggml_backend_sched_graph_compute(self.sched, graph)
        if status != lib.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed: {ffi.string(lib.ggml_status_to_string(status)).decode()}")

    def allocate(self, entry) -> None:
        """Allocate a cached graph's intermediates through the scheduler, unless it is the graph
        allocated last. The scheduler keeps one graph's plan, and planning rewrites the graph: a
        node whose input lives on another device reads a copy the scheduler made, in a context
        it frees at the next plan. So before another plan, the nodes get their own inputs back
        and the previous allocation's pointers are cleared (or they would count as placed)."""
        if entry is self._last_allocated:
            return
        sources = getattr(entry, "sources", None)
        if sources is None:  # never planned: remember every node's inputs as built
            nodes = [lib.ggml_graph_node(entry.graph, i) for i in range(lib.ggml_graph_n_nodes(entry.graph))]
            entry.sources = [(node, [node.src[j] for j in range(lib.GGML_MAX_SRC)]) for node in nodes]
        else:
            for node, srcs in sources:
                for j, src in enumerate(srcs):
                    node.src[j] = src
        t = lib.ggml_get_first_tensor(entry.ctx.ptr)
        while t != ffi.NULL:
            t.data = ffi.NULL
            t.buffer = ffi.NULL
            t = lib.ggml_get_next_tensor(entry.ctx.ptr, t)
        lib.ggml_backend_sched_reset(self.sched)
        self._last_allocated = None
        if not lib.ggml_backend_sched_alloc_graph(self.sched, entry.graph):
            raise MemoryError("ggml's scheduler could not allocate the compute graph")
        self._last_allocated = entry

    @property
    def n_splits(self) -> int:
        """How many pieces the scheduler cut the last allocated graph into."""
        return int(lib.ggml_backend_sched_get_n_splits(self.sched))

    # -- placement ------------------------------------------------------------------------------
    def plan(self, spec) -> None:
        loop = spec.layer_loop
        n_layer = int(spec.hparams[loop.repeat]) if loop is not None else 0
        self._layer_device = split_layers(n_layer, 1 + len(self.remotes))

    def layer_buffer_type(self, layer: int):
        """None for a layer the local CPU holds, else its server's buffer type."""
        device = self._layer_device[layer]
        return None if device == 0 else self.remotes[device - 1].buffer_type

    def placement(self, spec, name: str, layered: bool):
        """Where a weight goes: None = the local CPU (as the plain path places it), else a
        remote buffer type."""
        if not self._layer_device:
            self.plan(spec)
        if not layered:
            return None
        m = _LAYER_INDEX.search(name)
        return self.layer_buffer_type(int(m.group(1))) if m else None

    def layers_per_device(self) -> dict[str, int]:
        names = ["local CPU"] + [f"rpc {r.endpoint}" for r in self.remotes]
        return {n: self._layer_device.count(i) for i, n in enumerate(names)}

    def own(self, *objects) -> None:
        self._owned.extend(objects)

    def close(self) -> None:
        self._sched_finalizer()
        for obj in reversed(self._owned):
            obj.close()
        self._owned.clear()
        for remote in self.remotes:
            remote.close()
        self.cpu.close()
        if self._guarded:
            self._guarded = False
            release_abort_guard()


class SplitKVCache(KVCache):
    """The KV cache with each layer's tensors on that layer's device (one buffer per device)."""

    def __init__(self, backend: SplitBackend, spec, n_ctx: int, gtype):
        from porter.runtime.types import GGMLType

        self.n_ctx = n_ctx
        self.n_layer = int(spec.hparams["n_layer"])
        widths = {name: cache_widths(spec, name) for name in cache_names(spec)}
        states = {name: state_widths(spec, name) for name in state_names(spec)}
        count = sum(w > 0 for ws in (*widths.values(), *states.values()) for w in ws)
        contexts = {}  # device index -> Context

        def home(layer: int) -> Context:
            device = backend._layer_device[layer] if layer < len(backend._layer_device) else 0
            if device not in contexts:
                contexts[device] = Context(max(1, count))
            return contexts[device]

        self.caches = {name: [home(i).new_tensor(gtype, [w, n_ctx], f"cache_{name}_l{i}") if w else None
                              for i, w in enumerate(ws)] for name, ws in widths.items()}
        self.states = {name: [home(i).new_tensor(GGMLType.F32, [w], f"state_{name}_l{i}") if w else None
                              for i, w in enumerate(ws)] for name, ws in states.items()}
        self.k, self.v = self.caches["k"], self.caches["v"]
        need = kv_cache_bytes(spec, n_ctx, gtype)
        self._parts = []
        for device, ctx in sorted(contexts.items()):
            buft = backend.buffer_type if device == 0 else backend.remotes[device - 1].buffer_type
            where = "locally" if device == 0 else f"on {backend.remotes[device - 1].endpoint}"
            buffer = Buffer(ctx, buft, f"the KV cache {where} (of {need / 2**20:.0f} MiB for n_ctx={n_ctx})")
            lib.ggml_backend_buffer_clear(buffer.ptr, 0)
            self._parts.append((buffer, ctx))
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return sum(b.size for b, _ in self._parts)

    def close(self) -> None:
        for buffer, ctx in self._parts:
            buffer.close()
            ctx.close()
        self._parts.clear()


def load_split(path, endpoints: list[str], *, n_threads=None, use_repack=True, bf16_as_f16=True, use_mmap=True):
    """:func:`porter.runtime.loader.load_gguf` with the layers split across the local CPU and
    the RPC servers at ``endpoints``; the returned ``backend`` is a :class:`SplitBackend`."""
    from porter.runtime.loader import load_gguf

    backend = SplitBackend(endpoints, n_threads)
    try:
        return load_gguf(path, n_threads=n_threads, use_repack=use_repack, bf16_as_f16=bf16_as_f16,
                         use_mmap=use_mmap, backend=backend)
    except BaseException:
        backend.close()
        raise


SplitBackend.kv_cache_type = SplitKVCache
