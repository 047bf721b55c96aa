"""Transparent huge pages for the memory every token streams through: weights and the KV cache.

A decode step reads every weight once and, deep in a context, every cached key and value. With
the kernel's 4 KiB pages each 4 KiB of that is a new TLB entry, and the working set of even a
135M-parameter model (140 MiB in q8_0) is far beyond what the TLB holds: 36,000 page walks per
step. Backed by 2 MiB pages the same bytes need 70. Measured on a 2-core AVX-512 VM (THP in
``madvise`` mode, the default of Debian and Ubuntu), porter against its previous commit in the
same run: decode 1.04-1.10x (SmolLM2-135M and a 1.1B llama, q8_0), the same kernels on the same
bytes.

ggml allocates with ``posix_memalign`` and maps files with 4 KiB pages; llama.cpp does the
same. Here everything moves to huge pages after the fact, in a background thread at the lowest
priority (:class:`Migration`), so neither loading nor the first token waits for it (on this VM a
fresh 2 MiB page costs far more than 512 small ones the first time: the hypervisor backs it
then; asking for huge pages at allocation made the 1.1B's q4_0 load 3x slower):

* buffers ggml allocated and filled (repacked or copied weights, the KV cache) are collapsed in
  place (``MADV_COLLAPSE``, Linux 6.1+);
* weights read in place from the memory-mapped file (the default, as llama.cpp's ``mmap``) are
  copied into fresh anonymous huge pages, which ``mremap`` then puts at the very addresses the
  file was mapped at, so tensors, cached graphs and fused views keep their pointers. This
  kernel cannot collapse file pages itself (that needs ``CONFIG_READ_ONLY_THP_FOR_FS``), hence
  the copy; the weights then take anonymous memory (as with llama.cpp's ``--no-mmap``) instead
  of shared page cache.

Either way the bytes stay the same and the kernel swaps the pages under its own lock, so a graph
running meanwhile reads the same values. ``Model.settle()`` waits for the move.

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

HUGE = 2 << 20  # a PMD page on x86-64 and on arm64 with 4 KiB pages
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
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


def _round_up(address: int) -> int:
    return -(-address // HUGE) * HUGE


def _inner(address: int, size: int) -> tuple[int, int]:
    """The 2 MiB-aligned part of [address, address + size): (start, length), length 0 if none."""
    lo = _round_up(address)
    hi = (address + size) // HUGE * HUGE
    return lo, max(0, hi - lo)


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


def buffer_ranges(buffers) -> list[tuple[int, int]]:
    """(address, size) of the CPU's own memory among ggml ``buffers`` (porter.runtime.core.Buffer),
    what a :class:`Migration` collapses."""
    return [r for b in buffers for r in b.cpu_range()]


class Migration:
    """Puts memory on huge pages in a background thread at the lowest priority (see the module's
    docstring): ``remap``, (address, size) ranges of private file mappings, are copied into new
    anonymous huge pages put at the same addresses; ``collapse``, ranges of anonymous memory
    already in use, are collapsed in place (``MADV_COLLAPSE``). Only whole 2 MiB pages in them
    change. ``owner``: whatever keeps the memory alive (held until the thread is over); call
    :meth:`stop` before freeing it. ``done`` is set when over; ``moved``: the bytes now on huge
    pages, ``size``: the bytes it set out to move."""

    CHUNK = 32 << 20  # bytes per step between checks for stop()

    def __init__(self, owner, remap=(), collapse=()):
        self.remap = [r for r in (_inner(a, n) for a, n in remap) if r[1] > 0]
        self.collapse = [r for r in (_inner(a, n) for a, n in collapse) if r[1] > 0]
        self.size = sum(n for _, n in self.remap + self.collapse)
        self.moved = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._owner = owner
        self._thread = threading.Thread(target=self._run, name="porter-hugepages", daemon=True)
        atexit.register(self.stop)  # a daemon copying from memory torn down at exit would crash
        self._thread.start()

    @classmethod
    def start(cls, owner, remap=(), collapse=()) -> "Migration | None":
        """A migration, or None when the ranges hold no whole 2 MiB page or this is not Linux."""
        if _LIBC is None or not any(_inner(a, n)[1] for a, n in [*remap, *collapse]):
            return None
        return cls(owner, remap, collapse)

    def _run(self) -> None:
        try:
            if hasattr(os, "setpriority"):  # Linux: a thread's own nice value; compute comes first
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            for step, ranges in ((self._move, self.remap), (self._collapse, self.collapse)):
                for address, n in ranges:
                    step(address, n)
                    self.moved += n
        except Exception as exc:  # the memory stays on the pages it has: slower, never wrong
            _log.debug("huge pages: stopped (%s)", exc)
        finally:
            self._owner = None
            atexit.unregister(self.stop)
            self.done.set()

    def _check(self) -> None:
        if self._stop.is_set():
            raise InterruptedError("stopped")

    def _move(self, address: int, n: int) -> None:
        """Copy [address, address + n) (2 MiB-aligned) into new huge pages, then put those at address."""
        libc = _LIBC
        # 2 MiB-aligned anonymous memory, as the target is: mremap then moves whole huge pages
        # (a move to another offset within a 2 MiB page would split them)
        raw = libc.mmap(None, n + HUGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if raw in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap of anonymous memory failed")
        start, placed = _round_up(raw), False
        try:
            if libc.madvise(start, n, _MADV_HUGEPAGE) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) refused")
            for off in range(0, n, self.CHUNK):
                self._check()
                ctypes.memmove(start + off, address + off, min(self.CHUNK, n - off))  # releases the GIL
            self._check()
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

    def _collapse(self, address: int, n: int) -> None:
        """Collapse [address, address + n) of anonymous memory in use into huge pages: the kernel
        copies each 2 MiB and swaps the page tables under its lock (what khugepaged does to live
        processes), so threads using the memory meanwhile see the same bytes."""
        if _LIBC.madvise(address, n, _MADV_HUGEPAGE) != 0:  # also: pages faulted in later come huge
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) refused")
        for off in range(0, n, self.CHUNK):
            self._check()
            if _LIBC.madvise(address + off, min(self.CHUNK, n - off), _MADV_COLLAPSE) != 0:
                # before Linux 6.1 there is no MADV_COLLAPSE: khugepaged collapses advised memory
                # by itself, slowly
                raise OSError(ctypes.get_errno(), "madvise(MADV_COLLAPSE) refused")

    def stop(self) -> None:
        """Stop copying (the weights stay on whichever pages they are) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        atexit.unregister(self.stop)
