"""Fixtures of the runtime tests: one ggml backend per module, and the worst-error table."""

from __future__ import annotations

import pytest

from porter.runtime.core import Backend


@pytest.fixture(scope="module")
def rpc_build():
    """Fails (not skips) where ggml was built without its RPC backend."""
    from porter.runtime.devices import has_rpc

    if not has_rpc():
        pytest.fail("this ggml build has no RPC backend: rebuild it with `make ggml` (tools/build_ggml.py builds "
                    "it with -DGGML_RPC=ON), or point PORTER_GGML_DIR at such a build")


@pytest.fixture(scope="module")
def servers(rpc_build):
    """Two `porter rpc-server` processes on free loopback ports, for a module's tests."""
    from porter.testing.rpc import Server

    started = []
    try:
        for _ in range(2):
            started.append(Server())
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def backend():
    be = Backend(2)
    yield be
    be.close()


def pytest_terminal_summary(terminalreporter):
    import ophelpers

    if not ophelpers.WORST:
        return
    tr = terminalreporter
    tr.section("worst op errors (against float64 / transformers references)")
    tr.write_line(f"{'op':<48} {'metric':<9} {'worst':>9} {'of bound':>9} {'bound':>9} {'checks':>6}")
    for op in sorted(ophelpers.WORST):
        e = ophelpers.WORST[op]
        tr.write_line(f"{op:<48} {e['metric']:<9} {e['worst']:>9.3g} {e['ratio']:>9.0%} {e['bound']:>9.3g} {e['n']:>6}")
    tr.write_line("worst: largest error seen; of bound: the largest error / bound of any example (bound: that "
                  "example's bound, which for rope grows with the positions)")
