"""Every ggml resource porter creates (a backend comes with its threadpool) is freed exactly once:
by close(), by a with block, or by
garbage collection; porter.runtime.core.live_objects() counts what is still alive."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from porter.runtime.core import Backend, Buffer, Context, GraphRunner, get_data, live_objects, set_data
from porter.runtime.types import GGMLType


@pytest.fixture(autouse=True)
def nothing_alive_before():
    gc.collect()
    assert live_objects() == {}, "a previous test leaked ggml objects"
    yield
    gc.collect()


def use_everything(be: Backend):
    """Weights in a buffer, a graph runner with an allocator, one computation."""
    ctx = Context(2)
    w = ctx.new_tensor(GGMLType.F32, [8, 4], "w")
    buf = Buffer(ctx, be.buffer_type)
    set_data(w, np.arange(32, dtype=np.float32).reshape(4, 8))
    g = GraphRunner(be, max_nodes=16)
    x = g.input(np.ones((2, 8), np.float32))
    (y,) = g.compute([g.ops.mul_mat(w, x)])
    assert y.shape == (2, 4) and y[0, 1] == np.arange(8, 16).sum()
    assert get_data(w)[3, 7] == 31
    return ctx, buf, g


def test_close_frees_everything():
    be = Backend(1)
    ctx, buf, g = use_everything(be)
    assert live_objects() == {"backend": 1, "threadpool": 1, "context": 2, "buffer": 1, "gallocr": 1}
    g.close()
    assert live_objects() == {"backend": 1, "threadpool": 1, "context": 1, "buffer": 1}
    buf.close()
    ctx.close()
    be.close()
    assert live_objects() == {}
    # closing twice is harmless and frees nothing twice
    g.close()
    buf.close()
    ctx.close()
    be.close()
    assert live_objects() == {}


def test_with_blocks_free_everything():
    with Backend(1) as be:
        with GraphRunner(be, max_nodes=8) as g:
            g.compute([g.ops.silu(g.input(np.ones(4, np.float32)))])
            assert live_objects()["gallocr"] == 1
        assert live_objects() == {"backend": 1, "threadpool": 1}
    assert live_objects() == {}


def test_garbage_collection_frees_everything():
    be = Backend(1)
    ctx, buf, g = use_everything(be)
    assert sum(live_objects().values()) == 6  # backend, threadpool, 2 contexts, buffer, gallocr
    del ctx, buf, g, be
    gc.collect()
    assert live_objects() == {}


def test_buffer_keeps_its_context_alive():
    """A buffer's tensors are described by its context: dropping the context first must not free it."""
    be = Backend(1)
    ctx = Context(1)
    t = ctx.new_tensor(GGMLType.F32, [4], "t")
    buf = Buffer(ctx, be.buffer_type)
    del ctx
    gc.collect()
    assert live_objects()["context"] == 1
    set_data(t, np.ones(4, np.float32))
    assert get_data(t).sum() == 4
    del buf, t
    gc.collect()
    assert live_objects() == {"backend": 1, "threadpool": 1}
    be.close()


def test_many_runners_do_not_accumulate():
    with Backend(1) as be:
        for _ in range(50):
            with GraphRunner(be, max_nodes=8) as g:
                g.compute([g.ops.exp(g.input(np.zeros(3, np.float32)))])
        for _ in range(50):  # and without closing: garbage collection frees them
            g = GraphRunner(be, max_nodes=8)
            g.compute([g.ops.exp(g.input(np.zeros(3, np.float32)))])
        del g
        gc.collect()
        assert live_objects() == {"backend": 1, "threadpool": 1}


def test_repr_says_what_is_loaded(tmp_path):
    import inspect

    import tinygguf

    import porter

    with porter.load(tinygguf.write(tmp_path / "m.gguf"), n_ctx=8, n_threads=1) as m:
        text = repr(m)
    assert text.startswith("<porter.Model ") and "(tiny, causal LM) from m.gguf" in text and "n_ctx 8, 1 threads" in text
    assert "n_ctx" in inspect.signature(porter.load).parameters  # the real signature, not **kwargs
