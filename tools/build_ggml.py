"""Build the ggml porter runs: the sources llama.cpp itself ships, compiled for this machine.

Source: the ``vendor/llama.cpp/ggml`` folder of the pinned ``llama-cpp-python`` source archive
(PyPI serves it; ``pip download`` fetches it once into ``.cache/src``). It is the very ggml the
benchmarks' stock llama.cpp runs, so porter and the reference share kernels and repacked layouts.

Builds, in order, until one is proven to run on this machine:

* ``native``: ``-march=native`` (what a source build of llama.cpp does by default), llamafile's
  matrix kernels and CPU weight repacking on, AMX code off (``-mno-amx-*``: on earlier machines
  here AMX code crashed although the processor reported it);
* ``portable``: AVX2/FMA/F16C/BMI2 without ``-march=native``, the fallback when the native build
  fails to compile or fails its proof.

"Proven to run" means a child process loads the freshly built library and checks quantized
(repacked) matrix products, flash attention and a few ops against numpy
(``python -m porter.runtime.selftest``); a crash (SIGILL, SIGSEGV) or a wrong result rejects the
build. OpenMP is off: porter drives ggml's own persistent threadpool, whose idle workers sleep
instead of spinning (see ``porter.runtime.core``).

The result is installed into ``<prefix>/ggml`` (default: this Python's ``sys.prefix``, i.e. the
venv) with ``build-info.json`` saying which build it is; ``porter --version`` prints it.

    python tools/build_ggml.py [--variant auto|native|portable] [--prefix DIR] [--backends cuda|vulkan,...]

GPU builds (untested here: no GPU on porter's machines): ``--backends cuda`` (or the
``PORTER_GGML_BACKENDS`` environment variable; ``make ggml GGML_BACKENDS=cuda``) adds
``-DGGML_CUDA=ON`` (``vulkan``: ``-DGGML_VULKAN=ON``; any ggml backend name the same way), built
into libggml like the CPU and RPC backends, so that ggml's registry reports the GPU (``porter
devices``) and ``--device``/``-ngl`` can place layers on it. The toolkit (CUDA's nvcc, the Vulkan
SDK and glslc) must be installed; ``PORTER_GGML_CMAKE_ARGS`` passes any further cmake arguments
(e.g. ``-DCMAKE_CUDA_ARCHITECTURES=86``). The self-test still checks the CPU backend only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"  # keep in step with the bench extra in pyproject.toml
GGML_VERSION = "0.25.3"  # what that archive vendors; porter/runtime/_lib.py checks it at import
SRC_CACHE = ROOT / ".cache" / "src"
BUILD = ROOT / "build"

COMMON = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_BUILD_TESTS=OFF",
          "-DGGML_BUILD_EXAMPLES=OFF", "-DGGML_CPU=ON", "-DGGML_LLAMAFILE=ON", "-DGGML_CPU_REPACK=ON",
          "-DGGML_OPENMP=OFF", "-DGGML_BLAS=OFF", "-DGGML_CCACHE=OFF", "-DGGML_AMX_TILE=OFF",
          "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
          # ggml's RPC backend (libggml-rpc.so): `porter rpc-server` serves a CPU backend with it and
          # `--rpc` drives remote ones; built in like the CPU backend (GGML_BACKEND_DL stays off)
          "-DGGML_RPC=ON"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if X86 else ""
VARIANTS = {
    "native": ["-DGGML_NATIVE=ON"],
    "portable": (["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                  "-DGGML_BMI2=ON"] if X86 else ["-DGGML_NATIVE=OFF"]),
}


def log(msg: str) -> None:
    print(f"[build_ggml] {msg}", file=sys.stderr, flush=True)


def sources() -> Path:
    """The ggml folder of the pinned llama-cpp-python source archive (downloaded once)."""
    dest = BUILD / f"ggml-src-{GGML_VERSION}"
    if (dest / "CMakeLists.txt").exists():
        return dest
    archive = SRC_CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.exists():
        SRC_CACHE.mkdir(parents=True, exist_ok=True)
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source archive (ggml {GGML_VERSION} inside)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(SRC_CACHE)], check=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/ggml/"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                tar.extract(m, tmp, filter="data")
    text = (tmp / "CMakeLists.txt").read_text()
    found = ".".join(_cmake_set(text, f"GGML_VERSION_{p}") for p in ("MAJOR", "MINOR", "PATCH"))
    if found != GGML_VERSION:
        raise SystemExit(f"llama-cpp-python {LLAMA_CPP_PYTHON} vendors ggml {found}, expected {GGML_VERSION}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _cmake_set(text: str, name: str) -> str:
    import re

    m = re.search(rf"set\({name}\s+(\d+)\)", text)
    return m.group(1) if m else "?"


def tool(name: str) -> str:
    """cmake/ninja from this Python's environment (pip installs them) or else the system's."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install {name}")
    return found


def backend_flags(backends: str) -> list[str]:
    """``cuda,vulkan`` -> -DGGML_CUDA=ON -DGGML_VULKAN=ON, then PORTER_GGML_CMAKE_ARGS as given."""
    names = [b.strip().upper() for b in backends.split(",") if b.strip()]
    bad = [n for n in names if not n.isalnum()]
    if bad:
        raise SystemExit(f"--backends: not a ggml backend name: {', '.join(bad)} (e.g. cuda, vulkan)")
    return [f"-DGGML_{n}=ON" for n in names] + shlex.split(os.environ.get("PORTER_GGML_CMAKE_ARGS", ""))


def build(variant: str, src: Path, prefix: Path, extra: list[str] = ()) -> Path:
    suffix = "".join(f"-{f[7:-3].lower()}" for f in extra if f.startswith("-DGGML_") and f.endswith("=ON"))
    bdir = BUILD / f"ggml-{GGML_VERSION}-{variant}{suffix}"
    inst = BUILD / f"ggml-{GGML_VERSION}-{variant}{suffix}-install"
    flags = COMMON + VARIANTS[variant] + list(extra)
    cflags = NO_AMX
    cmd = [tool("cmake"), "-S", str(ROOT / "tools" / "ggml"), "-B", str(bdir), f"-DGGML_SOURCE_DIR={src}", "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
           f"-DCMAKE_INSTALL_PREFIX={inst}", f"-DCMAKE_C_FLAGS={cflags}", f"-DCMAKE_CXX_FLAGS={cflags}",
           "-DCMAKE_INSTALL_LIBDIR=lib", *flags]
    log(f"configuring the {variant} build: {' '.join(flags)} {cflags}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    t = time.perf_counter()
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    log(f"compiling ({jobs} jobs; about 3 minutes on 2 cores)")
    subprocess.run([tool("cmake"), "--build", str(bdir), "-j", jobs], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(inst, ignore_errors=True)
    subprocess.run([tool("cmake"), "--install", str(bdir)], check=True, stdout=subprocess.DEVNULL)
    info = {"ggml_version": GGML_VERSION, "variant": variant,
            "source": f"llama-cpp-python {LLAMA_CPP_PYTHON} source archive, vendor/llama.cpp/ggml",
            "cmake_flags": flags, "c_flags": cflags, "machine": platform.machine(),
            "compile_seconds": round(time.perf_counter() - t, 1)}
    (inst / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    return inst


def proven(inst: Path) -> tuple[bool, str]:
    """Run porter's self-test against a build in a child process (a crash cannot take us down)."""
    env = dict(os.environ, PORTER_GGML_DIR=str(inst))
    proc = subprocess.run([sys.executable, "-m", "porter.runtime.selftest"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return False, f"self-test failed ({proc.returncode}): {why[0]}"
    return True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["auto", "native", "portable"], default="auto")
    ap.add_argument("--prefix", type=Path, default=Path(sys.prefix))
    ap.add_argument("--backends", default=os.environ.get("PORTER_GGML_BACKENDS", ""),
                    help="GPU (or other) ggml backends to build in, comma-separated: cuda, vulkan, ... "
                         "(default: $PORTER_GGML_BACKENDS, else none)")
    args = ap.parse_args()
    extra = backend_flags(args.backends)
    src = sources()
    order = ["native", "portable"] if args.variant == "auto" else [args.variant]
    reasons = []
    for variant in order:
        try:
            inst = build(variant, src, args.prefix, extra)
        except subprocess.CalledProcessError as exc:
            reasons.append(f"{variant} build failed ({exc})")
            log(f"warning: {reasons[-1]}")
            continue
        ok, why = proven(inst)
        if not ok:
            reasons.append(f"{variant}: {why}")
            log(f"warning: the {variant} build does not run here: {why}")
            continue
        info = json.loads((inst / "build-info.json").read_text())
        info["selftest"] = why
        if reasons:
            info["fallback_because"] = reasons
        (inst / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
        dest = args.prefix / "ggml"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(inst, dest, symlinks=True)
        log(f"installed the {variant} ggml {GGML_VERSION} build into {dest} ({why})")
        return 0
    log("error: no ggml build runs on this machine: " + "; ".join(reasons))
    return 1


if __name__ == "__main__":
    sys.exit(main())
