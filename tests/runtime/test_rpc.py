"""Models split across the local CPU and ggml RPC servers (`porter rpc-server`, `--rpc`).

Real `porter rpc-server` processes are started on free loopback ports and stopped by the tests.
The split run is compared with the single-process run of the same file: the same kernels run
the same ops on the same data, so f32 logits agree to rounding (in practice bit for bit) and
greedy tokens are identical. Failures (a server that is not there, one killed mid-generation)
must end the client with one clear error and a non-zero status, within seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from porter.runtime.devices import RPCError, probe
from porter.testing.rpc import Server, _die_with_parent, _env, _free_port

pytestmark = pytest.mark.usefixtures("rpc_build")
PROMPT = [1, 5, 9, 22, 7, 3, 11, 40, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (5 layers) as f32 and q8_0 GGUF files."""
    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    cls = architectures()["llama"]
    folder = tmp_path_factory.mktemp("rpc")
    ckpt = tiny_checkpoint(cls, folder / "ckpt", seed=3, num_hidden_layers=5)
    files = {}
    for outtype in ("f32", "q8_0"):
        files[outtype] = folder / f"tiny.{outtype}.gguf"
        convert(ckpt, files[outtype], outtype, progress=False, force=True, arch_cls=cls)
    return files


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def _local_and_split(path, endpoints, n_new=24):
    import porter

    with porter.load(path, n_threads=1) as m:
        logits = m.logits(PROMPT)
        tokens = list(m.generate_ids(PROMPT, n_new))
    with porter.load(path, n_threads=1, rpc=endpoints) as m:
        split = m.backend.layers_per_device()
        split_logits = m.logits(PROMPT)
        n_splits = m.backend.n_splits
        split_tokens = list(m.generate_ids(PROMPT, n_new))
        placed = set(m.placed.values())
    return logits, tokens, split_logits, split_tokens, split, n_splits, placed


@pytest.mark.parametrize("n_servers", [1, 2])
def test_split_f32_logits_and_greedy_tokens_equal_the_local_run(tiny, servers, n_servers):
    endpoints = [s.endpoint for s in servers[:n_servers]]
    logits, tokens, split_logits, split_tokens, split, n_splits, placed = _local_and_split(tiny["f32"], endpoints)
    # every device holds layers, and the graph really ran in pieces on them
    assert len(split) == 1 + n_servers and all(n >= 1 for n in split.values()), split
    assert sum(split.values()) == 5
    assert n_splits >= 1 + n_servers, n_splits
    assert len(placed) == n_servers, placed  # one weight buffer type per server
    assert logits.shape == split_logits.shape == (len(PROMPT), logits.shape[1])
    assert nmse(split_logits, logits) <= 1e-12, nmse(split_logits, logits)
    assert np.abs(split_logits - logits).max() <= 1e-5
    assert split_tokens == tokens


def test_split_q8_0_matches_the_local_run(tiny, servers):
    endpoints = [s.endpoint for s in servers]
    logits, tokens, split_logits, split_tokens, *_ = _local_and_split(tiny["q8_0"], endpoints)
    assert nmse(split_logits, logits) <= 1e-6, nmse(split_logits, logits)
    assert split_tokens == tokens


def test_split_model_survives_context_changes_and_reset(tiny, servers):
    """Prefill and decode graphs alternate (the scheduler plans each afresh): a second
    conversation after reset() reproduces the first."""
    import porter

    with porter.load(tiny["f32"], n_threads=1, rpc=[servers[0].endpoint]) as m:
        first = list(m.generate_ids(PROMPT, 12))
        m.reset()
        again = list(m.generate_ids(PROMPT, 12))
        step = m.forward(PROMPT[:3], use_cache=False)
    with porter.load(tiny["f32"], n_threads=1) as m:
        local_step = m.forward(PROMPT[:3], use_cache=False)
        local = list(m.generate_ids(PROMPT, 12))
    assert first == again == local
    assert nmse(step, local_step) <= 1e-12


def _porter(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "porter", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_unreachable_server_is_one_clear_error(tiny):
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    proc = _porter("run", str(tiny["f32"]), "--no-chat", "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}")
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "cannot connect" in errors[0], proc.stderr


def test_silent_server_times_out_with_a_clear_error(tiny):
    """A listener that accepts and never answers (as a server busy with another client does)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.monotonic()
        proc = _porter("run", str(tiny["f32"]), "--no-chat", "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}")
    assert time.monotonic() - start < 30
    assert proc.returncode == 1, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "did not answer" in errors[0], proc.stderr


def test_bad_rpc_option_is_refused(tiny):
    for value, words in (("localhost", "host:port"), ("127.0.0.1:0", "1..65535"), ("a:1,a:1", "twice")):
        proc = _porter("run", str(tiny["f32"]), "--no-chat", "-n", "1", "--rpc", value)
        assert proc.returncode == 1 and words in proc.stderr, (value, proc.stderr)


def test_server_killed_mid_generation_ends_the_client_cleanly(tiny):
    server = Server()
    script = textwrap.dedent(f"""
        import porter
        with porter.load({str(tiny['f32'])!r}, n_threads=1, n_ctx=4096, rpc=[{server.endpoint!r}]) as m:
            for i, token in enumerate(m.generate_ids([1, 2, 3], 4000)):
                if i == 20:
                    print("generating", flush=True)
        print("finished")
    """)
    client = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "generating"
        server.stop(signal.SIGKILL)
        killed = time.monotonic()
        out, err = client.communicate(timeout=30)
        ended = time.monotonic() - killed
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        server.stop()
    assert "finished" not in out
    assert client.returncode == 1, (client.returncode, err)  # not -6 (SIGABRT): no abort of the client
    assert ended < 10, ended
    errors = _error_lines(err)
    assert len(errors) == 1 and "lost the connection to the RPC server" in errors[0] and server.endpoint in errors[0], err


def test_rpc_server_refuses_a_public_address_without_the_flag():
    proc = _porter("rpc-server", "--host", "0.0.0.0", "--port", str(_free_port()), timeout=30)
    assert proc.returncode == 1
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "--allow-public" in errors[0] and "authentication" in errors[0], proc.stderr
    help_text = _porter("rpc-server", "--help", timeout=30).stdout
    assert "no authentication" in help_text.lower() and "--allow-public" in help_text


def test_rpc_server_reports_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = _porter("rpc-server", "--port", str(taken.getsockname()[1]), timeout=30)
    assert proc.returncode == 1
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "cannot listen" in errors[0], proc.stderr


def test_devices_lists_the_cpu_and_a_server():
    server = Server()  # a fresh one: this test process keeps its connections to the module's servers
    try:
        proc = _porter("devices", "--rpc", server.endpoint, timeout=30)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CPU ") and " cpu " in lines[0] and "MiB free of" in lines[0]
    assert any(line.startswith("RPC") and " rpc " in line and server.endpoint in line for line in lines), lines


@pytest.fixture(scope="module")
def smollm2_files(request, tmp_path_factory):
    """SmolLM2-135M-Instruct (built from its PyPI package, cached like the other real-model tests)
    converted to f32 and q8_0."""
    from porter import examples
    from porter.pipeline import convert

    cache = None if os.environ.get("PORTER_CACHE") else request.config.cache.mkdir("porter")
    ckpt = examples.materialize_smollm2(cache, progress=False)
    folder = tmp_path_factory.mktemp("rpc-smollm2")
    files = {}
    for outtype in ("f32", "q8_0"):
        files[outtype] = folder / f"smollm2.{outtype}.gguf"
        convert(ckpt, files[outtype], outtype, progress=False, force=True)
    return files


@pytest.mark.realmodel
@pytest.mark.parametrize("outtype, gate", [("f32", 1e-10), ("q8_0", 1e-6)])
def test_smollm2_across_two_servers_equals_the_single_process_run(smollm2_files, outtype, gate):
    """The issue's bar: two `porter rpc-server` processes plus the client, SmolLM2's 30 layers
    split 10/10/10, against the single-process run of the same file. Fresh servers: this test
    process keeps its connections to the module's servers."""
    import porter

    started = [Server(), Server()]
    try:
        with porter.load(smollm2_files[outtype], n_threads=1) as m:
            ids = m.encode("The capital of France is a city that")
            logits = m.logits(ids)
            tokens = list(m.generate_ids(ids, 24))
        with porter.load(smollm2_files[outtype], n_threads=1, rpc=[s.endpoint for s in started]) as m:
            split = m.backend.layers_per_device()
            split_logits = m.logits(ids)
            split_tokens = list(m.generate_ids(ids, 24))
    finally:
        for server in started:
            server.stop()
    assert list(split.values()) == [10, 10, 10], split
    assert nmse(split_logits, logits) <= gate, nmse(split_logits, logits)
    assert split_tokens == tokens


def test_rpc_server_stops_on_ctrl_c():
    """ggml's server loop never returns to Python: it runs in a thread so that SIGINT still stops it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "porter", "rpc-server", "--port", str(port), "-t", "1"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                probe(f"127.0.0.1:{port}", timeout=2)
                break
            except RPCError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_server_of_another_protocol_version_is_refused(tiny):
    """A server that answers HELLO with another major version (ggml would abort on it)."""
    import struct
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 + 8 + 24)
            conn.sendall(struct.pack("<Q", 28) + bytes([6, 0, 0, 0]) + bytes(24))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        proc = _porter("run", str(tiny["f32"]), "--no-chat", "-p", "hi", "-n", "2", "--rpc", f"127.0.0.1:{port}")
    finally:
        thread.join(10)
        listener.close()
    assert proc.returncode == 1, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "protocol 6.0.0" in errors[0], proc.stderr
