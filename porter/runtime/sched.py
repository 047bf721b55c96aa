"""A model split by layers across ggml devices (the local CPU, RPC servers, GPUs when the ggml
build has them), run through ggml's backend scheduler (``ggml_backend_sched``).

Which layer goes where is :mod:`porter.runtime.placement`'s choice (``--device``, ``-ngl``; by
default with ``--rpc`` the local CPU and the servers share the layers equally, CPU first);
each layer's weights and its KV cache live on its device. Weights outside the loop (token
embeddings, output norm and head) stay local, where the graph's inputs are. ggml's scheduler
then runs every op where its weights (or the cache it writes) live, copying activations across
at the boundaries (no op offload: an op on local weights runs locally).

Only this path differs from the plain CPU one (:class:`porter.runtime.core.Backend` with
gallocr); the model code sees the same backend interface (``buffer_type``, ``compute``,
``n_threads``, ``threads_in_use``, ``close``) plus :meth:`SplitBackend.allocate`.
"""

from __future__ import annotations

import re

from porter.errors import ModelError
from porter.runtime import placement
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Backend, Buffer, Context, _track
from porter.runtime.devices import _require_rpc, check_reachable, connect, endpoint_of, exit_cleanly_on_abort, release_abort_guard
from porter.runtime.graph import KVCache, cache_names, cache_widths, kv_cache_bytes, state_names, state_widths
from porter.runtime.placement import split_layers  # noqa: F401  (re-exported: the split rule)

GRAPH_SIZE = 32768  # nodes the scheduler can place (porter's graphs use 64 per layer + a few hundred)
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def device_label(dev) -> str:
    """A device as messages name it: ``RPC0 (127.0.0.1:50052)``, ``CUDA0``, ``CPU`` (None)."""
    if dev is None:
        return "CPU"
    name = placement.device_name(dev)
    endpoint = endpoint_of(dev)
    return f"{name} ({endpoint})" if endpoint else name


class DeviceBackend:
    """A backend on one ggml device other than the local CPU (ggml keeps an RPC connection)."""

    def __init__(self, owner, device):
        self.device = device
        self.name = placement.device_name(device)
        self.endpoint = endpoint_of(device)
        self.label = device_label(device)
        self.ptr = lib.ggml_backend_dev_init(device, ffi.NULL)
        if self.ptr == ffi.NULL:
            raise ModelError(f"ggml could not start a backend on {self.label}")
        self._finalizer = _track(owner, "backend", lib.ggml_backend_free, self.ptr)
        self.buffer_type = lib.ggml_backend_get_default_buffer_type(self.ptr)

    def close(self) -> None:
        self._finalizer()


class SplitBackend:
    """The local CPU backend (with porter's threadpool) plus other devices, under one scheduler.

    ``endpoints``: RPC servers to connect (their devices join ggml's registry as RPC0, RPC1...);
    ``devices``/``n_gpu_layers``: the choice :mod:`porter.runtime.placement` describes."""

    kv_cache_type = None  # SplitKVCache, set below

    def __init__(self, endpoints: list[str] = (), n_threads: int | None = None, *, devices: list[str] | None = None,
                 n_gpu_layers=None):
        self._guarded = False
        self.endpoints = list(endpoints)
        rpc_devices = []
        if self.endpoints:
            _require_rpc()
            check_reachable(self.endpoints)  # before ggml connects: it would abort on failure
            exit_cleanly_on_abort(self.endpoints)
            self._guarded = True
        try:
            for endpoint in self.endpoints:
                rpc_devices += connect(endpoint)
            self.chosen = placement.choose(devices, n_gpu_layers, rpc_devices)
        except BaseException:
            self._release_guard()
            raise
        self.n_gpu_layers = n_gpu_layers
        self.cpu = Backend(n_threads)
        self.remotes: list[DeviceBackend] = []  # the devices holding layers, other than the local CPU
        self._owned: list = []  # weight buffers and contexts this backend's devices hold
        self._owners: list = []  # the device (None: the local CPU) of each layer
        self._layer_device: list[int] = []  # each layer's slot: 0 the local CPU, i > 0 remotes[i - 1]
        self._planned = False
        self._last_allocated = None
        self.sched = None
        self._sched_finalizer = lambda: None

    def _start_scheduler(self) -> None:
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
        """Place the layers (raises OptionError for an -ngl the model cannot take) and start the
        scheduler over the devices that hold any."""
        loop = spec.layer_loop
        n_layer = int(spec.hparams[loop.repeat]) if loop is not None else 0
        self._owners = placement.layer_owners(n_layer, self.chosen, self.n_gpu_layers)
        used = list(dict.fromkeys(d for d in self._owners if d is not None))
        self.remotes = [DeviceBackend(self, d) for d in used]
        slot = {None: 0, **{d: i + 1 for i, d in enumerate(used)}}
        self._layer_device = [slot[d] for d in self._owners]
        self._planned = True
        self._start_scheduler()

    def layer_buffer_type(self, layer: int):
        """None for a layer the local CPU holds, else its device's buffer type."""
        device = self._layer_device[layer]
        return None if device == 0 else self.remotes[device - 1].buffer_type

    def slot_buffer_type(self, slot: int):
        return self.cpu.buffer_type if slot == 0 else self.remotes[slot - 1].buffer_type

    def slot_label(self, slot: int) -> str:
        return "locally" if slot == 0 else f"on {self.remotes[slot - 1].label}"

    def placement(self, spec, name: str, layered: bool):
        """Where a weight goes: None = the local CPU (as the plain path places it), else a
        device's buffer type."""
        if not self._planned:
            self.plan(spec)
        if not layered:
            return None
        m = _LAYER_INDEX.search(name)
        return self.layer_buffer_type(int(m.group(1))) if m else None

    def layers_per_device(self) -> dict[str, int]:
        """Layers held per device, by the names ``porter devices`` prints (CPU, RPC0, ...), the
        local CPU first, then the chosen devices in order (those given no layer too)."""
        devices = [None] + [d for d in dict.fromkeys(self.chosen) if d is not None]
        return {device_label(d).split(" ")[0]: self._owners.count(d) for d in devices}

    def describe(self) -> str:
        """``CPU 10, RPC0 (127.0.0.1:50052) 10, ...``: the split, for the CLI's status line."""
        devices = [None] + [d for d in dict.fromkeys(self.chosen) if d is not None]
        return ", ".join(f"{device_label(d)} {self._owners.count(d)}" for d in devices)

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
        self._release_guard()

    def _release_guard(self) -> None:
        if self._guarded:
            self._guarded = False
            release_abort_guard()


class SplitKVCache(KVCache):
    """The KV cache with each layer's tensors on that layer's device (one buffer per device)."""

    def __init__(self, backend: SplitBackend, spec, n_ctx: int, gtype, huge_pages: bool = False):
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
            buft, where = backend.slot_buffer_type(device), backend.slot_label(device)
            buffer = Buffer(ctx, buft, f"the KV cache {where} (of {need / 2**20:.0f} MiB for n_ctx={n_ctx})")
            lib.ggml_backend_buffer_clear(buffer.ptr, 0)
            self._parts.append((buffer, ctx))
        self.migration = self._to_huge_pages([b for b, _ in self._parts]) if huge_pages else None
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return sum(b.size for b, _ in self._parts)

    def close(self) -> None:
        if self.migration is not None:  # before the memory it works on goes
            self.migration.stop()
        for buffer, ctx in self._parts:
            buffer.close()
            ctx.close()
        self._parts.clear()


def load_split(path, endpoints: list[str] = (), *, devices=None, n_gpu_layers=None, n_threads=None, use_repack=True,
               bf16_as_f16=True, use_mmap=True, huge_pages=None):
    """:func:`porter.runtime.loader.load_gguf` with the layers placed across devices (the RPC
    servers at ``endpoints`` connected first; ``devices``, ``n_gpu_layers``: see
    :mod:`porter.runtime.placement`); the returned ``backend`` is a :class:`SplitBackend`."""
    from porter.runtime.loader import load_gguf

    backend = SplitBackend(endpoints, n_threads, devices=devices, n_gpu_layers=n_gpu_layers)
    try:
        return load_gguf(path, n_threads=n_threads, use_repack=use_repack, bf16_as_f16=bf16_as_f16,
                         use_mmap=use_mmap, backend=backend, huge_pages=huge_pages)
    except BaseException:
        backend.close()
        raise


SplitBackend.kv_cache_type = SplitKVCache
