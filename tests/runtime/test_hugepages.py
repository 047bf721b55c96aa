"""Weights and KV cache on 2 MiB pages (porter.runtime.hugepages): advised buffers fault in huge,
mapped weights move onto huge pages at the same addresses with the same bytes, a stopped move
leaves the mapping as it was, and a model whose weights moved still computes what transformers
computes. The kernel's word for what backs a range is /proc/self/smaps' AnonHugePages."""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import pytest

from porter.runtime import hugepages
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Backend, Buffer, Context
from porter.runtime.types import GGMLType

MiB = 1 << 20
needs_thp = pytest.mark.skipif(hugepages.thp_mode() not in ("always", "madvise"),
                               reason="the kernel offers no transparent huge pages to this process")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mremap are Linux's")


def huge_bytes(lo: int, hi: int) -> int:
    """Bytes of [lo, hi) that the kernel backs with anonymous huge pages."""
    total, overlap = 0, False
    with open(f"/proc/{os.getpid()}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                overlap = start < hi and end > lo
            elif head == "AnonHugePages:" and overlap:
                total += int(line.split()[1]) * 1024
    return total


def address(ptr) -> int:
    return int(ffi.cast("uintptr_t", ptr))


@needs_thp
def test_a_buffer_in_use_collapses_onto_huge_pages():
    # (no "and an unadvised one does not" here: smaps counts per mapping, and the heap the buffer
    # may come from can hold memory an earlier test moved)
    with Backend(1) as be:
        ctx = Context(1)
        ctx.new_tensor(GGMLType.F32, [(8 * MiB) // 4], "big")
        buf = Buffer(ctx, be.buffer_type)
        lib.ggml_backend_buffer_clear(buf.ptr, 7)  # every page in use
        ((base, size),) = buf.cpu_range()
        move = hugepages.Migration.start(owner=buf, collapse=buf.cpu_range())
        assert move.done.wait(60) and move.moved == move.size >= 4 * MiB
        assert huge_bytes(base, base + size) >= 4 * MiB  # 8 MiB hold at least three whole 2 MiB pages
        assert (np.frombuffer(ffi.buffer(ffi.cast("char *", base), size), np.uint8) == 7).all()
        buf.close()
        ctx.close()


def _mapped_file(tmp_path, size: int):
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return data, m


@needs_thp
def test_a_mapping_moves_onto_huge_pages_at_the_same_address(tmp_path):
    data, m = _mapped_file(tmp_path, 13 * MiB + 123)
    view = np.frombuffer(m, np.uint8)
    base = address(ffi.from_buffer(m))
    assert huge_bytes(base, base + len(m)) == 0
    move = hugepages.Migration.start(owner=m, remap=[(base, len(m))])
    assert move.done.wait(60)
    (start, _), = move.remap
    assert move.moved == move.size >= 10 * MiB and base <= start < base + 2 * MiB
    assert huge_bytes(base, base + len(m)) >= move.moved  # the same addresses, now on huge pages
    np.testing.assert_array_equal(view, data)  # the same bytes, the unmoved edges included
    del view
    m.close()


@linux_only
def test_a_stopped_move_leaves_the_mapping_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr(hugepages.Migration, "CHUNK", 1 * MiB)
    data, m = _mapped_file(tmp_path, 16 * MiB)
    base = address(ffi.from_buffer(m))
    move = hugepages.Migration.start(owner=m, remap=[(base, len(m))])
    move.stop()  # at once: most likely mid-copy
    assert move.done.is_set() and move.moved in (0, move.size)
    np.testing.assert_array_equal(np.frombuffer(m, np.uint8), data)
    m.close()


def test_the_switch(monkeypatch):
    monkeypatch.setenv("PORTER_HUGE_PAGES", "0")
    assert hugepages.default() is False
    monkeypatch.setenv("PORTER_HUGE_PAGES", "1")
    assert hugepages.default() is True
    monkeypatch.delenv("PORTER_HUGE_PAGES")
    assert hugepages.default() is (hugepages.thp_mode() in ("always", "madvise"))
    assert hugepages.Migration.start(owner=None, remap=[(2 * MiB + 4096, 2 * MiB)]) is None  # no whole 2 MiB page in it
    assert hugepages.spans([(10, 5), (0, 4), (3 * MiB, 1)], gap=MiB) == [(0, 15), (3 * MiB, 1)]


# a llama big enough that its matrices span whole 2 MiB pages (f32: ~10 MiB)
BIG = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "vocab_size": 2048}


@needs_thp
def test_a_model_whose_weights_moved_computes_what_transformers_does(tmp_path):
    from porter.testing.parity import assert_parity, port_tiny

    ids = np.random.default_rng(3).integers(0, BIG["vocab_size"], 12).tolist()
    with port_tiny("llama", BIG, tmp_path, seed=4, n_ctx=64) as pair:
        m = pair.porter
        move = m._migration
        before = {n: address(t.data) for n, t in m.weights.items()}
        first = m.logits(ids)  # graphs built (and maybe run) while the move goes on
        assert m.settle(60) and move.done.is_set() and move.moved >= 4 * MiB
        assert {n: address(t.data) for n, t in m.weights.items()} == before
        down = address(m.weights["blk.1.ffn_down.weight"].data)
        assert huge_bytes(down, down + 1) > 0  # a matrix every token reads is on huge pages now
        np.testing.assert_array_equal(m.logits(ids), first)
        assert_parity(pair, ids, context="weights moved onto huge pages")
        import porter

        with porter.load(pair.gguf, n_ctx=64, huge_pages=False) as plain:
            assert plain._migration is None
            np.testing.assert_array_equal(plain.logits(ids), first)
        porter.load(pair.gguf, n_ctx=64).close()  # closed while its move has barely begun


@needs_thp
def test_repacked_weights_and_the_kv_cache_move_and_scattered_small_weights_stay(tmp_path):
    from porter.testing.parity import port_tiny

    sizes = {"hidden_size": 512, "intermediate_size": 4096, "num_hidden_layers": 2, "vocab_size": 4096,
             "tie_word_embeddings": False}
    with port_tiny("llama", sizes, tmp_path, outtype="q4_0", seed=5, n_ctx=32) as pair:
        m = pair.porter
        assert m.repacked, "ggml repacks q4_0 matrices on this CPU"
        rbuffer = m._repack[1]
        base = address(lib.ggml_backend_buffer_get_base(rbuffer.ptr))
        first = m.logits([1, 2, 3])
        assert m.settle(60)
        assert huge_bytes(base, base + rbuffer.size) >= 2 * MiB
        # what stays mapped and is read every token: the norms, far apart across the file (the
        # repacked matrices lie between them), and the q6_K output head (1.7 MiB): no whole
        # 2 MiB page of them to move
        assert m._migration.remap == [] and m._migration.collapse
        np.testing.assert_array_equal(m.logits([1, 2, 3]), first)
        from porter.runtime.graph import KVCache

        kv = KVCache(m.backend, m.spec, 16384, huge_pages=True)  # 8 MiB of f32 keys and values
        assert kv.migration.done.wait(60) and kv.migration.moved >= 4 * MiB
        ((base, size),) = kv.buffer.cpu_range()
        assert huge_bytes(base, base + size) >= 4 * MiB
        kv.close()
