"""Transparent huge pages for the memory every token streams through: weights and the KV cache.

A decode step reads every weight once and, deep in a context, every cached key and value. With
the kernel's 4 KiB pages each 4 KiB of that is a new TLB entry, and the working set of even a
135M-parameter model (140 MiB in q8_0) is far beyond what the TLB holds: 36,000 page walks per
step. Backed by 2 MiB pages the same bytes need 70. Measured on a 2-core AVX-512 VM (THP in
``madvise`` mode, the default of Debian and Ubuntu): SmolLM2-135M decode 1.05-1.09x, the 1.1B
1.05-1.09x, the same kernels on the same bytes.

ggml allocates with ``posix_memalign`` and maps files with 4 KiB pages; llama.cpp does the
same. Here:

* buffers ggml allocates for us (copied and repacked weights, the KV cache) are advised
  (``MADV_HUGEPAGE``) right after allocation, before anything touches them, so the kernel backs
  them with huge pages as they fault in, at no extra cost;
* weights read in place from the memory-mapped file (the default, as llama.cpp's ``mmap``:
  loading stays instant) move to huge pages in the background after loading
  (:class:`Migration`): a low-priority thread copies them into fresh anonymous huge-page memory
  and ``mremap`` puts that memory at the very addresses the file was mapped at, so tensors,
  cached graphs and fused views keep their pointers. The bytes are the same, so a graph running
  meanwhile reads the same values either way (the kernel swaps the mapping under its own lock).
  This kernel cannot collapse file pages into huge pages itself (``MADV_COLLAPSE`` needs
  ``CONFIG_READ_ONLY_THP_FOR_FS``), hence the copy. The cost: the weights then take anonymous
  memory (as with llama.cpp's ``--no-mmap``) instead of shared page cache.

Off with ``porter.load(..., huge_pages=False)`` or ``PORTER_HUGE_PAGES=0``; nothing happens where
the kernel has no THP (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``[never]``) or is
not Linux.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from pathlib import Path

HUGE = 2 << 20  # x86-64 and arm64 (4 KiB granule) PMD size
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MADV_HUGEPAGE = 14
_PROT_READ, _PROT_WRITE = 1, 2
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MAP_FAILED = ctypes.c_void_p(-1).value
_log = logging.getLogger("porter")


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never); None off Linux."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def default() -> bool:
    """Whether loads use huge pages when not told: ``PORTER_HUGE_PAGES`` (0 or 1) if set, else
    whenever the kernel offers them to a process that asks."""
    env = os.environ.get("PORTER_HUGE_PAGES")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "no", "off", "false")
    return thp_mode() in ("always", "madvise")


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.mremap.restype = ctypes.c_void_p
    return libc


_LIBC = _libc()


def _inner(address: int, size: int) -> tuple[int, int]:
    """The 2 MiB-aligned part of [address, address + size): (start, length), length 0 if none."""
    lo = -(-address // HUGE) * HUGE
    hi = (address + size) // HUGE * HUGE
    return lo, max(0, hi - lo)


def advise(address: int, size: int) -> bool:
    """Ask for huge pages for the whole 2 MiB pages inside [address, address + size) of
    anonymous memory (pages not yet touched fault in huge). Whether the kernel took it."""
    lo, n = _inner(address, size)
    if _LIBC is None or n == 0:
        return False
    return _LIBC.madvise(lo, n, _MADV_HUGEPAGE) == 0


def spans(ranges, gap: int = 64 << 10) -> list[tuple[int, int]]:
    """(address, size) ranges merged where less than ``gap`` bytes lie between them (alignment,
    a norm's weights: copied along rather than cutting a huge page out), in address order."""
    out: list[list[int]] = []
    for lo, size in sorted(ranges):
        if out and lo - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], lo + size)
        else:
            out.append([lo, lo + size])
    return [(lo, hi - lo) for lo, hi in out]


class Migration:
    """Moves ranges of private file mappings onto anonymous huge pages, in a background thread
    (see the module's docstring). ``ranges``: (address, size) pairs; only their whole 2 MiB pages
    move. ``owner``: whatever keeps the mappings alive (held until the move is over); call
    :meth:`stop` before unmapping them. ``done`` is set when over, ``moved``: the bytes now on
    huge pages, ``size``: the bytes it set out to move."""

    CHUNK = 32 << 20  # bytes copied between checks for stop()

    def __init__(self, ranges, owner):
        self.ranges = [r for r in (_inner(a, n) for a, n in ranges) if r[1] > 0]
        self.size = sum(n for _, n in self.ranges)
        self.moved = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._owner = owner
        self._thread = threading.Thread(target=self._run, name="porter-hugepages", daemon=True)
        atexit.register(self.stop)  # a daemon copying from a mapping torn down at exit would crash
        self._thread.start()

    @classmethod
    def start(cls, ranges, owner) -> "Migration | None":
        """A migration of the ranges, or None when they hold no whole 2 MiB page or this is not Linux."""
        if _LIBC is None or not any(_inner(a, n)[1] for a, n in ranges):
            return None
        return cls(ranges, owner)

    def _run(self) -> None:
        try:
            if hasattr(os, "setpriority"):  # Linux: a thread's own nice value; compute comes first
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            for address, n in self.ranges:
                if self._stop.is_set():
                    break
                self._move(address, n)
                self.moved += n
        except Exception as exc:  # the weights stay where they are: slower, never wrong
            _log.debug("huge pages: weights stay on the file's pages (%s)", exc)
        finally:
            self._owner = None
            atexit.unregister(self.stop)
            self.done.set()

    def _move(self, address: int, n: int) -> None:
        """Copy [address, address + n) (2 MiB-aligned) into new huge pages, then put those at address."""
        libc = _LIBC
        # 2 MiB-aligned anonymous memory, as the target is: mremap then moves whole huge pages
        # (a move to another offset within a 2 MiB page would split them)
        raw = libc.mmap(None, n + HUGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if raw in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap of anonymous memory failed")
        start, placed = -(-raw // HUGE) * HUGE, False
        try:
            if libc.madvise(start, n, _MADV_HUGEPAGE) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) refused")
            for off in range(0, n, self.CHUNK):
                if self._stop.is_set():
                    raise InterruptedError("stopped")
                ctypes.memmove(start + off, address + off, min(self.CHUNK, n - off))  # releases the GIL
            if self._stop.is_set():
                raise InterruptedError("stopped")
            if libc.mremap(start, n, n, _MREMAP_MAYMOVE | _MREMAP_FIXED, address) != address:
                raise OSError(ctypes.get_errno(), "mremap onto the mapped weights failed")
            placed = True
        finally:
            # what is left of the anonymous allocation: all of it unless mremap took [start, start + n)
            pieces = [(raw, start - raw), (start + n, raw + HUGE - start)]
            if not placed:
                pieces.append((start, n))
            for addr, length in pieces:
                if length:
                    libc.munmap(addr, length)

    def stop(self) -> None:
        """Stop copying (the weights stay on whichever pages they are) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        atexit.unregister(self.stop)
