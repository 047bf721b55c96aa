"""Loading ggml through cffi (ABI mode) with declarations generated from the pinned wheel.

``tools/gen_cdef.py`` writes ``_ggml_cdef.h`` from the headers of ``libggml-python``; this module
checks at import that the shared library reports the version those headers came from, because
tensor struct fields are read directly and a mismatch would read garbage.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path

import cffi

from porter.errors import GGMLVersionError

# ggml otherwise tries to attach a debugger to print a backtrace when it aborts.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

CDEF_PATH = Path(__file__).with_name("_ggml_cdef.h")
EXPECTED_WHEEL = "0.20.2.post1"
EXPECTED_GGML_VERSION = "0.20.2"


def _library_dir() -> Path:
    import libggml  # the wheel's (empty) package, used only to find its files

    root = Path(libggml.__file__).parent
    # the PyPI wheel ships lib64/; a wheel rebuilt from the sdist (make native) has lib/
    return next((root / d for d in ("lib64", "lib") if (root / d / "libggml.so").exists()), root / "lib64")


def _load():
    ffi = cffi.FFI()
    ffi.cdef(CDEF_PATH.read_text())
    try:
        wheel = metadata.version("libggml-python")
    except metadata.PackageNotFoundError as exc:
        raise GGMLVersionError(
            "the ggml library (pip package libggml-python) is not installed; run `make setup`"
        ) from exc
    if wheel != EXPECTED_WHEEL:
        raise GGMLVersionError(
            f"libggml-python {wheel} is installed but porter's ggml declarations were generated "
            f"from {EXPECTED_WHEEL}; install libggml-python=={EXPECTED_WHEEL} or regenerate them "
            "with `python tools/gen_cdef.py` and update EXPECTED_WHEEL"
        )
    lib = ffi.dlopen(str(_library_dir() / "libggml.so"))
    version = ffi.string(lib.ggml_version()).decode()
    if version != EXPECTED_GGML_VERSION:
        raise GGMLVersionError(
            f"libggml.so reports version {version}, expected {EXPECTED_GGML_VERSION} "
            "(the version porter's cffi declarations match); reinstall libggml-python"
        )
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
