"""Matrix-product throughput: ggml ``mul_mat`` against numpy float32 ``@``, side by side.

    python bench/matmul.py [--threads 2] [--reps 7] [--m 2048] [--k 2048] [--n 512]

Computes ``X @ W.T`` with W (m x k) and X (n x k) (the shape of a 2048-wide projection applied to
512 tokens) for several weight types: ggml with the weights in the type (and, for Q4_0/Q4_K, in
ggml's CPU_REPACK buffer type where the build has it), numpy always in float32 on the
dequantized weights. Both use the same thread count; the table gives the median of the
repetitions in GFLOP/s (2 m n k flops per product) and the ratio ggml / numpy.

numpy's speed depends on its BLAS and on OPENBLAS_CORETYPE (set on some machines here to work
around old OpenBLAS bugs; it slows a current OpenBLAS): the script prints both. To measure
numpy at its best, run it with those variables unset in that one command:
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/matmul.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--m", type=int, default=2048, help="output features (rows of W)")
    p.add_argument("--k", type=int, default=2048, help="input features")
    p.add_argument("--n", type=int, default=512, help="tokens (rows of X)")
    p.add_argument("--types", default="F32,F16,Q8_0,Q4_0,Q4_K")
    return p.parse_args()


ARGS = _parse()
# numpy's BLAS reads its thread count when it loads: set it before importing numpy.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from porter.runtime._lib import GGML_VERSION, ffi, lib  # noqa: E402
from porter.runtime.core import Backend, Buffer, Context, set_data  # noqa: E402
from porter.runtime.quant import dequantize, quantize  # noqa: E402
from porter.runtime.types import GGMLType  # noqa: E402


def numpy_blas() -> dict:
    """Which BLAS numpy uses, its kernel (core) and thread count."""
    info: dict = {}
    try:
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            if pool.get("user_api") == "blas":
                info = {"library": pool.get("internal_api"), "version": pool.get("version"),
                        "kernel": pool.get("architecture"), "threads": pool.get("num_threads")}
                break
    except ImportError:
        pass
    if not info:  # numpy's bundled scipy-openblas, read directly
        libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
        if libs:
            so = ctypes.CDLL(libs[0])
            for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "")):
                try:
                    corename = getattr(so, f"{prefix}get_corename{suffix}")
                    config = getattr(so, f"{prefix}get_config{suffix}")
                    threads = getattr(so, f"{prefix}get_num_threads{suffix}")
                except AttributeError:
                    continue
                corename.restype = config.restype = ctypes.c_char_p
                info = {"library": "openblas", "version": config().decode(), "kernel": corename().decode(),
                        "threads": threads()}
                break
    if not info:
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = cfg.get("Build Dependencies", {}).get("blas", {}) if isinstance(cfg, dict) else {}
        info = {"library": blas.get("name", "unknown"), "version": blas.get("version", "?"), "kernel": "?",
                "threads": "?"}
    return info


def repack_buffer_type():
    """ggml's CPU_REPACK extra buffer type, if this build has it (never the AMX one: it crashes here)."""
    reg = lib.ggml_backend_cpu_reg()
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if fn == ffi.NULL:
        return None
    get = ffi.cast("ggml_backend_dev_get_extra_bufts_t", fn)
    dev = lib.ggml_backend_dev_by_type(lib.GGML_BACKEND_DEVICE_TYPE_CPU)
    bufts = get(dev)
    i = 0
    while bufts != ffi.NULL and bufts[i] != ffi.NULL:
        if ffi.string(lib.ggml_backend_buft_name(bufts[i])).decode() == "CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def bench_ggml(be: Backend, gtype: GGMLType, wq: bytes, x: np.ndarray, buft) -> tuple[list[float], np.ndarray]:
    m, k, n = ARGS.m, ARGS.k, x.shape[0]
    wctx = Context(1)
    w = wctx.new_tensor(gtype, [k, m], "w")
    wbuf = Buffer(wctx, buft)
    lib.ggml_backend_tensor_set(w, wq, 0, len(wq))  # a repack buffer rearranges the blocks here
    xctx = Context(1)
    xt = xctx.new_tensor(GGMLType.F32, [k, n], "x")
    xbuf = Buffer(xctx, be.buffer_type)
    set_data(xt, x)
    gctx = Context(1, graph_size=8)
    y = lib.ggml_mul_mat(gctx.ptr, w, xt)
    lib.ggml_set_output(y)
    graph = lib.ggml_new_graph_custom(gctx.ptr, 8, False)
    lib.ggml_build_forward_expand(graph, y)
    galloc = lib.ggml_gallocr_new(be.buffer_type)
    try:
        if not lib.ggml_gallocr_alloc_graph(galloc, graph):
            raise MemoryError("could not allocate the product")
        be.compute(graph)  # warm-up
        times = []
        for _ in range(ARGS.reps):
            t0 = time.perf_counter()
            be.compute(graph)
            times.append(time.perf_counter() - t0)
        out = np.empty((n, m), np.float32)
        lib.ggml_backend_tensor_get(y, ffi.from_buffer(out), 0, out.nbytes)
    finally:
        lib.ggml_gallocr_free(galloc)
        for obj in (gctx, xbuf, xctx, wbuf, wctx):
            obj.close()
    return times, out


def bench_numpy(wf: np.ndarray, x: np.ndarray) -> tuple[list[float], np.ndarray]:
    wt = wf.T  # numpy computes X @ W.T; BLAS handles the transposed operand without a copy
    out = x @ wt  # warm-up
    times = []
    for _ in range(ARGS.reps):
        t0 = time.perf_counter()
        out = x @ wt
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    console = Console(width=max(Console().width, 100))
    m, k, n = ARGS.m, ARGS.k, ARGS.n
    flop = 2.0 * m * n * k
    blas = numpy_blas()
    features = [f for f in ("avx", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "avx_vnni", "f16c", "fma", "amx_int8")
                if getattr(lib, f"ggml_cpu_has_{f}", None) and getattr(lib, f"ggml_cpu_has_{f}")()]
    console.print(f"[bold]X ({n} x {k}) @ W.T, W ({m} x {k})[/bold]: {flop / 1e9:.2f} GFLOP per product, "
                  f"median of {ARGS.reps} after one warm-up")
    console.print(f"ggml {GGML_VERSION}: {ARGS.threads} threads, CPU features {', '.join(features)}")
    console.print(f"numpy {np.__version__}: {blas.get('library')} {blas.get('version')}, kernel "
                  f"{blas.get('kernel')}, {blas.get('threads')} threads")
    console.print("OPENBLAS_CORETYPE=" + repr(os.environ.get("OPENBLAS_CORETYPE")) +
                  " OPENBLAS_L2_SIZE=" + repr(os.environ.get("OPENBLAS_L2_SIZE")))

    rng = np.random.default_rng(0)
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((n, k)).astype(np.float32)
    be = Backend(ARGS.threads)
    repack = repack_buffer_type()
    table = Table(title="matmul throughput (GFLOP/s, higher is better)")
    for col in ("weights", "buffer", "ggml ms", "ggml GFLOP/s", "numpy ms", "numpy GFLOP/s", "ggml/numpy", "err"):
        table.add_column(col, justify="left" if col in ("weights", "buffer") else "right", no_wrap=True)
    for name in ARGS.types.split(","):
        gtype = GGMLType[name.strip().upper()]
        wq = quantize(w, gtype)
        wf = dequantize(wq, gtype, w.shape)
        targets = [("CPU", be.buffer_type)]
        # the types ggml 0.20.2 repacks on x86 (Q8_0 in CPU_REPACK crashes in mul_mat here)
        if repack is not None and gtype in (GGMLType.Q4_0, GGMLType.Q4_K):
            targets.append(("CPU_REPACK", repack))
        # numpy (float32 on the dequantized weights) measured right next to ggml for this type
        np_times, np_out = bench_numpy(wf, x)
        np_t = statistics.median(np_times)
        for label, buft in targets:
            times, out = bench_ggml(be, gtype, wq, x, buft)
            t = statistics.median(times)
            scale = np.sqrt((x.astype(np.float64) ** 2).sum(1))[:, None] * np.sqrt((wf.astype(np.float64) ** 2).sum(1))[None, :]
            err = float((np.abs(out.astype(np.float64) - np_out) / scale).max())
            table.add_row(gtype.name, label, f"{t * 1e3:.1f}", f"{flop / t / 1e9:.1f}", f"{np_t * 1e3:.1f}",
                          f"{flop / np_t / 1e9:.1f}", f"{np_t / t:.2f}", f"{err:.0e}")
    be.close()
    console.print(table)
    console.print("err: largest |ggml - numpy| of a dot product over ||x|| ||w|| (ggml rounds the activations "
                  "to the weight type's dot-product type); numpy multiplies the dequantized weights in float32")


if __name__ == "__main__":
    main()
