"""`porter rpc-server` subprocesses on free loopback ports, started and stopped by tests and
benchmarks (``Server``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from porter.runtime.devices import RPCError, probe

ROOT = Path(__file__).resolve().parents[2]  # the source tree this porter runs from


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PORTER_ADAPTIVE_THREADS="0")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies (Linux), so a test run
    that is killed leaves no server behind; SIGINT back to its default so Python handles it."""
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `porter rpc-server` subprocess on a free loopback port."""

    def __init__(self, threads: int = 1):
        self.port = _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "porter", "rpc-server", "--port", str(self.port),
                                      "-t", str(threads)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"porter rpc-server exited ({self.proc.returncode}): {self.proc.stderr.read()}")
            try:
                probe(self.endpoint, timeout=2)
                return
            except RPCError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("porter rpc-server did not come up within 60 s") from None
                time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
