"""Loading ggml through cffi (ABI mode) with declarations generated from its headers.

porter runs the ggml that ``make setup`` builds (``tools/build_ggml.py``: the sources the pinned
llama-cpp-python archive vendors, compiled for this machine, or the portable build when the
native one does not compile or does not pass its self-test), installed in ``<venv>/ggml`` with a
``build-info.json`` saying which build it is. ``PORTER_GGML_DIR`` points elsewhere.

``tools/gen_cdef.py`` writes ``_ggml_cdef.h`` from that build's headers; this module checks at
import that the shared library reports the version those headers came from, because tensor
struct fields are read directly and a mismatch would read garbage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import cffi

from porter.errors import GGMLVersionError

# ggml otherwise tries to attach a debugger to print a backtrace when it aborts.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

CDEF_PATH = Path(__file__).with_name("_ggml_cdef.h")
EXPECTED_GGML_VERSION = "0.25.3"  # tools/build_ggml.py builds it; _ggml_cdef.h comes from its headers


def ggml_dir() -> Path:
    """Where the ggml build porter uses is installed (``lib/``, ``include/``, ``build-info.json``)."""
    env = os.environ.get("PORTER_GGML_DIR")
    return Path(env) if env else Path(sys.prefix) / "ggml"


def build_info() -> dict:
    """What tools/build_ggml.py recorded about the build: variant (native | portable), flags..."""
    try:
        return json.loads((ggml_dir() / "build-info.json").read_text())
    except (OSError, ValueError):
        return {}


def _load():
    ffi = cffi.FFI()
    ffi.cdef(CDEF_PATH.read_text())
    libdir = ggml_dir() / "lib"
    if not (libdir / "libggml.so").exists():
        raise GGMLVersionError(
            f"porter's ggml is not installed (no {libdir / 'libggml.so'}); run `make setup` "
            "(it builds ggml with tools/build_ggml.py) or set PORTER_GGML_DIR")
    # libggml.so needs libggml-base.so and its backends (built in, GGML_BACKEND_DL off: CPU, RPC
    # when the build has it, CUDA/Vulkan/... in a GPU build): load them first, by path
    backends = sorted(p.name for p in libdir.glob("libggml-*.so") if p.name != "libggml-base.so")
    for dep in ("libggml-base.so", *backends):
        if (libdir / dep).exists():
            ffi.dlopen(str(libdir / dep), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    lib = ffi.dlopen(str(libdir / "libggml.so"), ffi.RTLD_NOW | ffi.RTLD_GLOBAL)
    version = ffi.string(lib.ggml_version()).decode()
    if version != EXPECTED_GGML_VERSION:
        raise GGMLVersionError(
            f"{libdir / 'libggml.so'} reports ggml {version}, expected {EXPECTED_GGML_VERSION} "
            "(the version porter's cffi declarations match); rebuild it with `make ggml`")
    return ffi, lib


ffi, lib = _load()
GGML_VERSION = ffi.string(lib.ggml_version()).decode()
GGML_COMMIT = ffi.string(lib.ggml_commit()).decode()


def cpu_features() -> list[str]:
    """The CPU features this ggml build uses (what the wheel was compiled for, as ggml reports it)."""
    names = ["sse3", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2", "avx_vnni", "avx512", "avx512_vbmi",
             "avx512_vnni", "avx512_bf16", "amx_int8", "neon", "arm_fma", "dotprod", "sve", "llamafile"]
    return [n.upper() for n in names if getattr(lib, f"ggml_cpu_has_{n}")()]

# ggml's own messages go to Python logging ("porter.ggml"): warnings and errors show, its
# informational chatter (e.g. one line per repacked tensor) only at debug level.
_log = logging.getLogger("porter.ggml")
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


@ffi.callback("void(enum ggml_log_level, const char *, void *)")
def _ggml_log(level, text, _user):  # pragma: no cover - called from C
    try:
        message = ffi.string(text).decode(errors="replace").rstrip()
        if message:
            _log.log(_LEVELS.get(int(level), logging.INFO), message)
    except Exception:
        pass


lib.ggml_log_set(_ggml_log, ffi.NULL)  # the module keeps _ggml_log alive for the process
