"""Lifetimes of ggml objects (backend, contexts, buffers, graphs) and numpy <-> ggml tensors.

Every object that owns a ggml resource frees it exactly once, either through ``close()`` (or a
``with`` block) or when it is garbage collected; :func:`live_objects` counts what is still
alive, so tests can prove nothing leaks.

Layout: a C-contiguous numpy array of shape ``(s0, ..., sn)`` is a ggml tensor whose ``ne`` is
the shape reversed, with identical bytes.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from porter.errors import ShapeError
from porter.runtime._lib import ffi, lib
from porter.runtime.types import FROM_NUMPY, NUMPY_DTYPE, GGMLType

_LIVE: Counter[str] = Counter()


def live_objects() -> dict[str, int]:
    """Number of ggml resources porter created and has not freed yet, by kind."""
    return {k: v for k, v in _LIVE.items() if v}


def _track(owner, kind: str, free_fn, ptr) -> weakref.finalize:
    _LIVE[kind] += 1

    def release(fn=free_fn, p=ptr, k=kind):
        fn(p)
        _LIVE[k] -= 1

    return weakref.finalize(owner, release)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as a, open(f"{topo}/core_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def default_threads() -> int:
    """``PORTER_THREADS`` if set, else the physical cores (as llama.cpp defaults to)."""
    env = os.environ.get("PORTER_THREADS")
    if env:
        return max(1, int(env))
    return physical_cores()


def available_memory() -> int | None:
    """Bytes of memory the kernel could hand out now (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def runnable_elsewhere() -> int | None:
    """How many threads of the whole machine are running or waiting for a core right now, not
    counting the caller (the fourth field of /proc/loadavg counts the caller itself); None
    where that is not known."""
    global _LOADAVG_FD
    try:
        if _LOADAVG_FD is None:  # kept open: read before every graph, pread needs no reopening
            _LOADAVG_FD = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        return max(0, int(os.pread(_LOADAVG_FD, 128, 0).split()[3].split(b"/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return None


_LOADAVG_FD: int | None = None


class ThreadPolicy:
    """How many of the pool's threads a graph uses, given what else is running.

    ggml's workers meet at a spinning barrier after every op: when another process holds the
    core of one of them, the others spin until the scheduler brings it back, and a decode step
    (hundreds of barriers) collapses from milliseconds to hundreds of milliseconds. So before a
    graph runs, the cores taken by other runnable threads are left to them: the graph gets the
    remaining cores, at least one thread (a single thread meets no barrier).

    The count of other runnable threads (``/proc/loadavg``) is an instant's: a kernel thread
    or a process that runs for a millisecond shows in it. So the policy acts only on evidence
    that lasts: the median of the samples of the last ``HORIZON`` seconds, and only once there
    are ``MIN_SAMPLES`` of them (a run of decode steps); a prompt's graph after a pause runs on
    every thread. ``adaptive=False`` (or ``PORTER_ADAPTIVE_THREADS=0``) always uses every thread.
    """

    HORIZON = 0.25  # seconds of samples: ~40 decode steps of a small model, ~8 of a 1B one
    MIN_SAMPLES = 3
    # at most one sample per INTERVAL seconds: the steps in between keep the last choice (a
    # sample costs ~50 us right after a graph, 1-2% of a small model's decode step)
    INTERVAL = 0.02

    def __init__(self, n_max: int, cores: int, adaptive: bool = True, clock=time.monotonic):
        self.n_max, self.cores, self.adaptive = n_max, cores, adaptive
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._last, self._choice = -math.inf, n_max

    def threads(self) -> int:
        if not self.adaptive or self.n_max == 1:
            return self.n_max
        now = self._clock()
        if now - self._last < self.INTERVAL:
            return self._choice
        self._last = now
        self._choice = self._sample(now)
        return self._choice

    def _sample(self, now: float) -> int:
        others = runnable_elsewhere()
        if others is None:
            return self.n_max
        samples = self._samples
        samples.append((now, others))
        while now - samples[0][0] > self.HORIZON:
            samples.popleft()
        if len(samples) < self.MIN_SAMPLES:
            return self.n_max
        busy = sorted(n for _, n in samples)[len(samples) // 2]
        return max(1, min(self.n_max, self.cores - busy))


class Backend:
    """The ggml CPU backend with a persistent threadpool.

    The pool's threads live as long as the backend; between graphs they sleep on a condition
    variable (``poll=0``) instead of spinning, so an idle or busy machine loses no core to them.
    How many of them a graph uses follows :class:`ThreadPolicy`.
    """

    def __init__(self, n_threads: int | None = None, *, adaptive: bool | None = None, poll: int = 0):
        self.ptr = lib.ggml_backend_cpu_init()
        if self.ptr == ffi.NULL:
            raise RuntimeError("ggml could not initialise its CPU backend")
        self._finalizer = _track(self, "backend", lib.ggml_backend_free, self.ptr)
        self.threadpool = None
        self._pool_finalizer = None
        self.n_threads = 0
        if adaptive is None:
            adaptive = os.environ.get("PORTER_ADAPTIVE_THREADS", "1") != "0"
        self._adaptive, self._poll = adaptive, int(poll)
        self.set_threads(n_threads or default_threads())

    def set_threads(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"thread count must be at least 1, got {n}")
        if n > lib.GGML_MAX_N_THREADS:
            raise ValueError(f"ggml runs at most {lib.GGML_MAX_N_THREADS} threads, got {n}")
        if n != self.n_threads:
            old = self._pool_finalizer
            params = ffi.new("struct ggml_threadpool_params *")
            lib.ggml_threadpool_params_init(params, n)
            params.poll = self._poll
            pool = lib.ggml_threadpool_new(params)
            if pool == ffi.NULL:
                raise RuntimeError(f"ggml could not start a pool of {n} threads")
            lib.ggml_backend_cpu_set_threadpool(self.ptr, pool)
            self.threadpool = pool
            self._pool_finalizer = _track(self, "threadpool", lib.ggml_threadpool_free, pool)
            if old is not None:
                old()
        lib.ggml_backend_cpu_set_n_threads(self.ptr, n)
        self.n_threads = n
        self.policy = ThreadPolicy(n, min(n, physical_cores()) if self._adaptive else n, self._adaptive)
        self._current = n

    @property
    def buffer_type(self):
        return lib.ggml_backend_get_default_buffer_type(self.ptr)

    def follow_policy(self) -> None:
        """Give the next graph the thread count :class:`ThreadPolicy` chooses now."""
        n = self.policy.threads()
        if n != self._current:
            lib.ggml_backend_cpu_set_n_threads(self.ptr, n)
            self._current = n

    def compute(self, graph) -> None:
        self.follow_policy()
        status = lib.ggml_backend_graph_compute(self.ptr, graph)
        if status != lib.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed: {ffi.string(lib.ggml_status_to_string(status)).decode()}")

    @property
    def threads_in_use(self) -> int:
        """Threads the last graph ran on (fewer than ``n_threads`` while other work holds cores)."""
        return self._current

    def close(self) -> None:
        # the backend holds the pool: free the backend first, then stop the pool's threads
        self._finalizer()
        if self._pool_finalizer is not None:
            self._pool_finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_TENSOR_OVERHEAD = lib.ggml_tensor_overhead()


class Context:
    """A ggml context holding tensor metadata only (``no_alloc``); data lives in backend buffers."""

    def __init__(self, n_tensors: int, graph_size: int = 0):
        size = n_tensors * lib.ggml_tensor_overhead()
        if graph_size:
            size += lib.ggml_graph_overhead_custom(graph_size, False)
        params = ffi.new("struct ggml_init_params *", {"mem_size": size, "mem_buffer": ffi.NULL, "no_alloc": True})
        self.ptr = lib.ggml_init(params[0])
        if self.ptr == ffi.NULL:
            raise MemoryError("ggml_init failed")
        self.capacity = n_tensors
        self.count = 0
        self._mem_size = lib.ggml_get_mem_size(self.ptr)  # fixed: the checks below read only the used part
        self._finalizer = _track(self, "context", lib.ggml_free, self.ptr)

    def ensure_room(self, n_tensors: int = 1) -> None:
        """Raise MemoryError unless ``n_tensors`` more tensors fit (ggml would abort instead)."""
        if self._mem_size - lib.ggml_used_mem(self.ptr) < n_tensors * _TENSOR_OVERHEAD:
            raise MemoryError(
                f"ggml context is full ({lib.ggml_used_mem(self.ptr)} of {lib.ggml_get_mem_size(self.ptr)} "
                "bytes used); build the graph in a larger context (GraphRunner(max_nodes=...))")

    def new_tensor(self, gtype: GGMLType, ne: Sequence[int], name: str | None = None):
        """A tensor of ggml shape ``ne`` (innermost first)."""
        ne = [int(n) for n in ne]
        if not 1 <= len(ne) <= 4:
            raise ShapeError(f"ggml tensors have 1 to 4 dimensions, got shape {ne}")
        if any(n < 0 for n in ne):
            raise ShapeError(f"negative dimension in shape {ne}")
        gtype = GGMLType(gtype)
        if ne[0] % gtype.block_size:
            raise ShapeError(
                f"{gtype.name} stores rows in blocks of {gtype.block_size}; a row of {ne[0]} "
                f"elements does not fit (choose a type whose block size divides {ne[0]})"
            )
        if self.count >= self.capacity:
            raise MemoryError(f"ggml context is full ({self.capacity} tensors)")
        self.ensure_room()
        self.count += 1
        t = lib.ggml_new_tensor(self.ptr, gtype, len(ne), ffi.new("int64_t[]", ne))
        if name:
            lib.ggml_set_name(t, name.encode()[:63])
        return t

    def close(self) -> None:
        self._finalizer()


def cpu_buffer(buffer) -> bool:
    """Whether a buffer is the CPU's own memory: plain, mapped, repacked (a repacked buffer does
    not call itself host memory: its bytes are not in ggml's standard layout)."""
    name = ffi.string(lib.ggml_backend_buft_name(lib.ggml_backend_buffer_get_type(buffer))).decode()
    return name == "CPU" or name.startswith("CPU_")


class Buffer:
    """A backend buffer holding all tensors of a context (typically: a model's weights)."""

    def __init__(self, ctx: Context, buffer_type, what: str = "the weight buffer"):
        self.ptr = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, buffer_type)
        if self.ptr == ffi.NULL:
            raise MemoryError(f"ggml could not allocate {what}")
        self._finalizer = _track(self, "buffer", lib.ggml_backend_buffer_free, self.ptr)
        self.ctx = ctx  # the metadata must outlive the data

    @property
    def size(self) -> int:
        return int(lib.ggml_backend_buffer_get_size(self.ptr))

    def cpu_range(self) -> list[tuple[int, int]]:
        """[(address, size)] of the buffer when it is the CPU's own memory, else [] (for
        :class:`porter.runtime.hugepages.Migration`)."""
        if not cpu_buffer(self.ptr):
            return []
        return [(int(ffi.cast("uintptr_t", lib.ggml_backend_buffer_get_base(self.ptr))), self.size)]

    def close(self) -> None:
        self._finalizer()


# --- tensor helpers -------------------------------------------------------------------------

def ne_of(t) -> tuple[int, int, int, int]:
    return (t.ne[0], t.ne[1], t.ne[2], t.ne[3])


def shape_of(t) -> tuple[int, ...]:
    """numpy-order shape of a tensor (trailing 1-dimensions above the tensor's rank dropped)."""
    n = lib.ggml_n_dims(t)
    return tuple(int(t.ne[i]) for i in reversed(range(n)))


def type_of(t) -> GGMLType:
    return GGMLType(t.type)


def ne_from_shape(shape: Sequence[int]) -> list[int]:
    return [int(s) for s in reversed(shape)] or [1]


def set_data(t, array: np.ndarray) -> None:
    """Copy a numpy array into a tensor whose data lives in a backend buffer."""
    gtype = type_of(t)
    expected = NUMPY_DTYPE.get(gtype)
    if expected is not None:
        if array.dtype != expected:
            raise ShapeError(f"tensor {tensor_name(t)!r} is {gtype.name}; got numpy {array.dtype}")
        if ne_from_shape(array.shape) + [1] * (4 - array.ndim) != list(ne_of(t))[: max(4, array.ndim)]:
            if int(np.prod(array.shape)) != nelements(t):
                raise ShapeError(f"tensor {tensor_name(t)!r} has ggml shape {ne_of(t)}; got array of shape {array.shape}")
    array = np.ascontiguousarray(array)
    nbytes = int(lib.ggml_nbytes(t))
    if array.nbytes != nbytes:
        raise ShapeError(f"tensor {tensor_name(t)!r} holds {nbytes} bytes ({gtype.name} {ne_of(t)}); got {array.nbytes}")
    lib.ggml_backend_tensor_set(t, ffi.from_buffer(array), 0, nbytes)


def write_input(t, array: np.ndarray) -> None:
    """:func:`set_data` for the graph inputs ``Model.forward`` fills before every step: the
    caller builds them in the input's own type and shape, so only the size is checked (the
    full checks cost more than a decode step's other Python work)."""
    array = np.ascontiguousarray(array)
    if array.nbytes != lib.ggml_nbytes(t):
        raise ShapeError(f"input {tensor_name(t)!r} holds {lib.ggml_nbytes(t)} bytes; got {array.nbytes}")
    lib.ggml_backend_tensor_set(t, ffi.from_buffer(array), 0, array.nbytes)


def get_data(t) -> np.ndarray:
    """Read a tensor back as a numpy array (plain types only; contiguous tensors only)."""
    gtype = type_of(t)
    dtype = NUMPY_DTYPE.get(gtype)
    if dtype is None:
        raise ShapeError(f"cannot read {gtype.name} tensor {tensor_name(t)!r} as numpy; cast it to F32 in the graph")
    if not lib.ggml_is_contiguous(t):
        raise ShapeError(f"tensor {tensor_name(t)!r} is not contiguous; add a cont node before reading it")
    n = lib.ggml_n_dims(t)
    shape = tuple(int(t.ne[i]) for i in reversed(range(max(n, 1))))
    out = np.empty(shape, dtype=dtype)
    lib.ggml_backend_tensor_get(t, ffi.from_buffer(out), 0, out.nbytes)
    return out


def host_view(t) -> np.ndarray | None:
    """A flat numpy array over a tensor's own memory (no copy) when that memory is the host's, the
    tensor contiguous and of a plain type; else None. Valid while the tensor's buffer is: for
    graph inputs and outputs that :class:`Model` writes and reads at every step without a ggml
    call (after a graph has streamed the weights through the caches, each call through cffi
    costs microseconds)."""
    if t.buffer == ffi.NULL or not lib.ggml_backend_buffer_is_host(t.buffer) or not lib.ggml_is_contiguous(t):
        return None
    dtype = NUMPY_DTYPE.get(type_of(t))
    if dtype is None:
        return None
    memory = ffi.buffer(ffi.cast("char *", t.data), int(lib.ggml_nbytes(t)))
    return np.frombuffer(memory, dtype=dtype)


def nelements(t) -> int:
    return int(t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3])


def tensor_name(t) -> str:
    return ffi.string(t.name).decode(errors="replace")


def numpy_type(array: np.ndarray) -> GGMLType:
    try:
        return FROM_NUMPY[array.dtype]
    except KeyError:
        raise ShapeError(f"numpy dtype {array.dtype} has no ggml counterpart") from None


def check_indices(array: np.ndarray, bound: int, op: str, name: str = "") -> None:
    """Raise ShapeError unless every index in ``array`` is in ``[0, bound)``: ggml aborts (or,
    in mul_mat_id, reads out of bounds) on an index outside the table it selects from."""
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= bound:
        bad = lo if lo < 0 else hi
        raise ShapeError(f"{op}: index {bad} in input {name!r} is out of range; valid indices are 0..{bound - 1}")


class GraphRunner:
    """Build a graph in a fresh context, allocate its intermediates, feed inputs, compute.

    Usage::

        with GraphRunner(backend) as g:
            x = g.input(np_array)
            y = g.ops.rms_norm(x, 1e-6)
            (out,) = g.compute([y])
    """

    def __init__(self, backend: Backend, max_nodes: int = 4096):
        from porter.runtime.ops import Ops

        self.backend = backend
        self.max_nodes = max_nodes
        # One graph, made first and cleared for each compute (a new graph per compute would fill
        # the context, and ggml aborts when a context is full). Its size covers every tensor the
        # context can hold plus as many tensors from other contexts (weights) as graph leafs.
        self._graph_size = max_nodes * 3
        self.ctx = Context(max_nodes * 2, graph_size=self._graph_size)
        self._graph = lib.ggml_new_graph_custom(self.ctx.ptr, self._graph_size, False)
        self.ops = Ops(self.ctx)
        self._feeds: list[tuple[object, np.ndarray]] = []
        self._galloc = None
        self._galloc_finalizer = None

    def input(self, array: np.ndarray | None = None, *, gtype: GGMLType | None = None,
              shape: Sequence[int] | None = None, name: str | None = None):
        """A graph input from a numpy array (or an empty one of a given type and numpy shape)."""
        if array is not None:
            array = np.ascontiguousarray(array)
            gtype = numpy_type(array) if gtype is None else gtype
            shape = array.shape
        t = self.ctx.new_tensor(gtype, ne_from_shape(shape), name)
        lib.ggml_set_input(t)
        if array is not None:
            self._feeds.append((t, array))
        return t

    def raw_input(self, gtype: GGMLType, ne: Sequence[int], data: bytes, name: str | None = None):
        """A graph input of any type (quantized included) from raw bytes in ggml layout."""
        t = self.ctx.new_tensor(gtype, ne, name)
        lib.ggml_set_input(t)
        self._feeds.append((t, np.frombuffer(data, dtype=np.uint8)))
        return t

    def compute(self, outputs: Sequence) -> list[np.ndarray]:
        graph = self._graph
        lib.ggml_graph_clear(graph)
        if self._galloc is not None:
            self._forget_allocations()
        for t in outputs:
            lib.ggml_set_output(t)
            lib.ggml_build_forward_expand(graph, t)
        if self._galloc is None:
            galloc = lib.ggml_gallocr_new(self.backend.buffer_type)
            if galloc == ffi.NULL:
                raise MemoryError("ggml could not create a graph allocator")
            self._galloc = galloc
            self._galloc_finalizer = _track(self, "gallocr", lib.ggml_gallocr_free, galloc)
        if not lib.ggml_gallocr_alloc_graph(self._galloc, graph):
            raise MemoryError("ggml could not allocate the graph's intermediate tensors")
        for t, array in self._feeds:
            nbytes = int(lib.ggml_nbytes(t))
            if array.nbytes != nbytes:
                raise ShapeError(f"input {tensor_name(t)!r} needs {nbytes} bytes, got {array.nbytes}")
            limit = self.ops.index_limits.get(int(ffi.cast("uintptr_t", t)))
            if limit is not None and array.size:
                check_indices(array, limit[0], limit[1], tensor_name(t))
            lib.ggml_backend_tensor_set(t, ffi.from_buffer(array), 0, nbytes)
        self.backend.compute(graph)
        return [get_data(t) for t in outputs]

    def _forget_allocations(self) -> None:
        """Detach this context's tensors from the previous compute's allocation, so the
        allocator plans the new graph from scratch (it treats a tensor whose ``data`` is set as
        allocated elsewhere, and a larger graph moves its buffer, which would leave stale pointers)."""
        t = lib.ggml_get_first_tensor(self.ctx.ptr)
        while t != ffi.NULL:
            t.data = ffi.NULL
            t.buffer = ffi.NULL
            t = lib.ggml_get_next_tensor(self.ctx.ptr, t)

    def close(self) -> None:
        if self._galloc_finalizer is not None:
            self._galloc_finalizer()
            self._galloc = self._galloc_finalizer = None
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
