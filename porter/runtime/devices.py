"""ggml's device registry and its RPC backend: what devices this ggml sees, serving the CPU
backend to other machines (``porter rpc-server``), and reaching such servers (``--rpc``).

ggml's RPC protocol has no authentication and no encryption: anyone who can reach the port can
allocate memory on the server and run graphs there. The server binds loopback by default and
refuses another address unless the caller says so explicitly (``allow_public``).

The client side of ggml-rpc aborts the process (``GGML_ABORT``) when a server is unreachable or
the connection breaks. porter therefore checks each server itself before ggml connects
(:func:`probe`: a TCP connection with a timeout and the protocol's HELLO exchange), and while
RPC is in use turns a ggml abort into one ``error:`` line and exit status 1
(:func:`exit_cleanly_on_abort`) instead of SIGABRT and a core dump.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass

from porter.errors import OptionError, PorterError
from porter.runtime._lib import ffi, lib

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
_HELLO = 14  # RPC_CMD_HELLO: fixed in every protocol version
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (ggml-rpc transport.h; not in the installed headers)


class RPCError(PorterError):
    """An RPC server cannot be reached, does not speak ggml's protocol, or broke off."""


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel | meta
    memory_free: int
    memory_total: int


_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def _device(dev) -> Device:
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    lib.ggml_backend_dev_memory(dev, free, total)
    return Device(ffi.string(lib.ggml_backend_dev_name(dev)).decode(),
                  ffi.string(lib.ggml_backend_dev_description(dev)).decode(),
                  _KINDS.get(int(lib.ggml_backend_dev_type(dev)), "other"), int(free[0]), int(total[0]))


def registry_devices() -> list[Device]:
    """The devices ggml's registry reports (the backends this build has built in)."""
    return [_device(lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count())]


def remote_devices(endpoint: str) -> list[Device]:
    """The devices an RPC server offers (checked with :func:`probe` first; ggml then keeps its
    connection to the server for this process's life)."""
    _require_rpc()
    check_reachable([endpoint])
    exit_cleanly_on_abort([endpoint])
    try:
        return [_device(dev) for dev in connect(endpoint)]
    finally:
        release_abort_guard()


_registered: dict[str, list] = {}  # endpoint -> its devices, in ggml's registry (one registration per process)


def connect(endpoint: str) -> list:
    """The ggml devices (``ggml_backend_dev_t``) of the RPC server at ``endpoint``, added to
    ggml's device registry as llama.cpp's ``--rpc`` adds them, so that they are named and found
    like any other device (``ggml_backend_dev_by_name``, ``porter devices``). The caller has
    probed the server (:func:`check_reachable`) and holds the abort guard."""
    if endpoint not in _registered:
        reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
        mark_connected(endpoint)
        if reg == ffi.NULL:
            raise RPCError(f"the RPC server at {endpoint} reports no device")
        lib.ggml_backend_register(reg)
        _registered[endpoint] = [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return _registered[endpoint]


def endpoint_of(dev) -> str | None:
    """The RPC endpoint a device was registered from, or None for a local device."""
    for endpoint, devs in _registered.items():
        if any(d == dev for d in devs):
            return endpoint
    return None


def has_rpc() -> bool:
    """Whether this ggml build has the RPC backend (tools/build_ggml.py builds it in)."""
    return lib.ggml_backend_reg_by_name(b"RPC") != ffi.NULL


def _require_rpc() -> None:
    if not has_rpc():
        from porter.runtime._lib import ggml_dir

        raise OptionError(f"the ggml build in {ggml_dir()} has no RPC backend; rebuild it with "
                          "`python tools/build_ggml.py` (it builds ggml with -DGGML_RPC=ON)")


# -- endpoints ------------------------------------------------------------------------------------

def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ggml splits at the first colon, so IPv6 literals cannot be used."""
    host, sep, port = text.strip().partition(":")
    if not sep or not host or not port.isdigit() or ":" in port:
        raise OptionError(f"--rpc {text!r}: give host:port (e.g. 127.0.0.1:{DEFAULT_PORT}); IPv6 addresses "
                          "are not supported by ggml's RPC backend")
    number = int(port)
    if not 1 <= number <= 65535:
        raise OptionError(f"--rpc {text!r}: the port must be in 1..65535")
    return host, number


def parse_endpoints(text: str) -> list[str]:
    """``host:port[,host:port...]`` -> the endpoints, checked (at most GGML_RPC_MAX_SERVERS, no repeats)."""
    endpoints = [f"{h}:{p}" for h, p in (parse_endpoint(part) for part in text.split(",") if part.strip())]
    if not endpoints:
        raise OptionError("--rpc: give at least one host:port")
    if len(set(endpoints)) != len(endpoints):
        raise OptionError(f"--rpc {text!r} names a server twice (a server serves one client at a time)")
    if len(endpoints) > lib.GGML_RPC_MAX_SERVERS:
        raise OptionError(f"--rpc: ggml drives at most {lib.GGML_RPC_MAX_SERVERS} servers, got {len(endpoints)}")
    return endpoints


_connected: set[str] = set()  # endpoints ggml holds a connection to (it keeps one per endpoint and process)


def check_reachable(endpoints: list[str]) -> None:
    """:func:`probe` every endpoint ggml has not connected to yet in this process. A server serves
    one client at a time and ggml keeps its connection open for the process's life, so a second
    connection of our own would only wait; ggml reuses its own instead."""
    for endpoint in endpoints:
        if endpoint not in _connected:
            probe(endpoint)


def mark_connected(endpoint: str) -> None:
    _connected.add(endpoint)


def probe(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to an RPC server and exchange HELLO; return its protocol version.

    Raises RPCError (instead of letting ggml abort) when the server is unreachable, answers
    something else, or does not answer within ``timeout`` (it serves one client at a time: a
    busy server accepts the connection and stays silent)."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", _HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            reply = _recv_exactly(sock, 8)
            (size,) = struct.unpack("<Q", reply)
            if size != 4 + _CONN_CAPS:
                raise RPCError(f"{endpoint} answered, but not as a ggml RPC server of this version "
                               f"(HELLO reply of {size} bytes)")
            major, minor, patch = _recv_exactly(sock, size)[:3]
    except socket.timeout:
        raise RPCError(f"the RPC server at {endpoint} did not answer within {timeout:g} s (unreachable, or busy "
                       "with another client: a ggml RPC server serves one client at a time)") from None
    except OSError as exc:
        raise RPCError(f"cannot connect to the RPC server at {endpoint}: {exc.strerror or exc}; start one there "
                       f"with `porter rpc-server --port {port}`") from None
    if major != lib.RPC_PROTO_MAJOR_VERSION or minor > lib.RPC_PROTO_MINOR_VERSION:
        raise RPCError(f"the RPC server at {endpoint} speaks protocol {major}.{minor}.{patch}, this ggml "
                       f"{lib.RPC_PROTO_MAJOR_VERSION}.{lib.RPC_PROTO_MINOR_VERSION}.{lib.RPC_PROTO_PATCH_VERSION}: "
                       "run the same porter (ggml) version on both ends")
    return major, minor, patch


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RPCError(f"the RPC server at {sock.getpeername()[0]}:{sock.getpeername()[1]} closed the "
                           "connection during the handshake (not a ggml RPC server?)")
        data += chunk
    return data


# -- aborts ---------------------------------------------------------------------------------------

_guarded: list[str] = []  # the endpoints in use, for the message
_guard_users = 0
_serving: list[str] = []  # set in an rpc-server process


@ffi.callback("void(const char *)")
def _on_abort(message):  # pragma: no cover - runs in the process's last moments (tested via subprocess)
    try:
        text = ffi.string(message).decode(errors="replace").strip()
        where = ", ".join(_guarded) or "?"
        if _serving:
            line = f"error: ggml aborted while serving {_serving[0]} (a graph this ggml cannot run?): {text}"
        elif "Remote RPC server crashed" in text:
            line = (f"error: lost the connection to the RPC server ({where}): it stopped, crashed or dropped the "
                    "connection; the run cannot continue")
        elif "Failed to connect" in text or "handshake failed" in text:
            line = f"error: cannot connect to the RPC server ({where}): {text.split(': ', 1)[-1]}"
        else:
            line = f"error: ggml aborted while using RPC servers ({where}): {text}"
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os.write(2, (line + "\n").encode())
    finally:
        os._exit(1)


def exit_cleanly_on_abort(endpoints: list[str]) -> None:
    """From now on a ggml abort (which ggml-rpc raises on a broken connection) ends the process
    with one ``error:`` line and exit status 1. ggml calls abort() right after its callback,
    so the callback cannot return: an exception cannot be raised to the caller instead."""
    global _guard_users
    _guarded[:] = list(dict.fromkeys(_guarded + list(endpoints)))
    _guard_users += 1
    lib.ggml_set_abort_callback(_on_abort)


def release_abort_guard() -> None:
    """Undo one :func:`exit_cleanly_on_abort`; the last one restores ggml's own abort."""
    global _guard_users
    _guard_users = max(0, _guard_users - 1)
    if _guard_users == 0:
        lib.ggml_set_abort_callback(ffi.NULL)


# -- serving --------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OptionError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_listen(host: str, port: int) -> None:
    """Raise OptionError unless ``host:port`` can be listened on now (ggml would only print
    'Failed to create server socket')."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml's server socket does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OptionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(host: str, port: int, n_threads: int, on_ready=None) -> None:
    """Serve this machine's CPU backend over ggml RPC until interrupted (the library's own
    server loop, ``ggml_backend_rpc_start_server``, in a thread so that Ctrl-C still works:
    the C loop never returns to Python). Raises RPCError if the loop ends by itself."""
    _require_rpc()
    if ":" in host:
        raise OptionError(f"--host {host!r}: IPv6 addresses are not supported by ggml's RPC server")
    check_listen(host, port)
    cpu = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
    if cpu == ffi.NULL:
        raise RPCError("this ggml build reports no CPU device")
    devices = ffi.new("ggml_backend_dev_t[1]", [cpu])
    endpoint = ffi.new("char[]", f"{host}:{port}".encode())
    failure: list[str] = []

    def loop():
        lib.ggml_backend_rpc_start_server(endpoint, ffi.NULL, n_threads, 1, devices)
        failure.append("ggml's server loop returned (see the message above)")

    # ggml's server aborts on a graph its backend cannot run: one error line and status 1 instead
    _serving[:] = [f"{host}:{port}"]
    lib.ggml_set_abort_callback(_on_abort)
    thread = threading.Thread(target=loop, name="ggml-rpc-server", daemon=True)
    thread.start()
    if on_ready is not None:
        on_ready()
    while thread.is_alive():
        thread.join(0.5)
    raise RPCError(f"the RPC server on {host}:{port} stopped: {failure[0] if failure else 'unknown reason'}")
