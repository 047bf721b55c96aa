"""Proof that a ggml build runs on this machine: ``python -m porter.runtime.selftest``.

``tools/build_ggml.py`` runs it in a child process on each fresh build (a native build whose
code the processor cannot execute dies here with SIGILL instead of in a user's session) and
keeps the build only when it exits 0. It checks, against numpy on the same rounded values:

* matrix products for every weight type porter writes or ggml repacks, in the CPU repack buffer
  where ggml takes the type (decode-sized, odd-sized and prompt-sized activations: each takes
  a different kernel);
* flash attention with F16 and F32 keys and values, and a softmax attention.
"""

from __future__ import annotations

import sys

import numpy as np

TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")


def _nmse(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.sum((ref - got) ** 2) / max(np.sum(ref ** 2), 1e-30))


def check_matmul(name: str, rng) -> bool:
    from porter.runtime import repack
    from porter.runtime.core import Backend, Buffer, Context, GraphRunner
    from porter.runtime._lib import ffi, lib
    from porter.runtime.quant import dequantize, quantize
    from porter.runtime.types import GGMLType

    gtype = GGMLType[name]
    k, m = 512, 64
    w = rng.standard_normal((m, k)).astype(np.float32)
    raw = w.astype(np.float16).tobytes() if gtype == GGMLType.F16 else quantize(w, gtype)
    wq = dequantize(raw, gtype, (m, k))
    packed = repack.supports(int(gtype), k, m)
    with Backend(2) as backend:
        ctx = Context(1)
        t = ctx.new_tensor(gtype, [k, m], "w")
        buf = Buffer(ctx, repack.repack_buffer_type() if packed else backend.buffer_type)
        data = np.frombuffer(raw, dtype=np.uint8)
        lib.ggml_backend_tensor_set(t, ffi.from_buffer(data), 0, data.nbytes)
        worst = 0.0
        for n in (1, 7, 64):
            x = rng.standard_normal((n, k)).astype(np.float32)
            with GraphRunner(backend) as g:
                (y,) = g.compute([g.ops.mul_mat(t, g.input(x))])
            worst = max(worst, _nmse(x @ wq.T, y))
        buf.close()
        ctx.close()
    ok = worst < 1e-3  # activations are rounded to 8 bits inside quantized products
    print(f"  mul_mat {name:6s} {'repacked' if packed else 'plain   '} nmse {worst:.1e} {'ok' if ok else 'WRONG'}")
    return ok


def check_attention(kv: str, rng) -> bool:
    from porter.runtime.core import Backend, GraphRunner
    from porter.runtime.types import GGMLType

    d, n_q, n_kv, h = 64, 5, 40, 4
    q = rng.standard_normal((h, n_q, d)).astype(np.float32)
    k = rng.standard_normal((h, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((h, n_kv, d)).astype(np.float32)
    if kv == "F16":
        k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    mask = np.zeros((n_q, n_kv), np.float32)
    mask[:, 30:] = -np.inf
    scale = 1 / np.sqrt(d)
    s = np.einsum("hqd,hkd->hqk", q, k) * scale + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("hqk,hkd->qhd", p / p.sum(-1, keepdims=True), v)  # ggml: [d, h, n_q]
    with Backend(2) as backend, GraphRunner(backend) as g:
        kt = g.input(k.astype(np.float16) if kv == "F16" else k)
        vt = g.input(v.astype(np.float16) if kv == "F16" else v)
        out = g.ops.flash_attn(g.input(q), kt, vt, g.input(mask.astype(np.float16)), scale)
        (got,) = g.compute([out])
    err = _nmse(ref, got.reshape(ref.shape))
    ok = err < (1e-5 if kv == "F16" else 1e-10)
    print(f"  flash_attn K/V {kv} nmse {err:.1e} {'ok' if ok else 'WRONG'}")
    return ok


def main() -> int:
    from porter.runtime._lib import GGML_VERSION, build_info, cpu_features

    rng = np.random.default_rng(0)
    print(f"ggml {GGML_VERSION} {build_info().get('variant', '?')} build; CPU: {' '.join(cpu_features())}")
    results = [check_matmul(name, rng) for name in TYPES]
    results += [check_attention(kv, rng) for kv in ("F32", "F16")]
    from porter.runtime import repack
    from porter.runtime.types import GGMLType

    packed = [n for n in TYPES if repack.supports(int(GGMLType[n]), 512, 64)]
    if not all(results):
        print("self-test FAILED", file=sys.stderr)
        return 1
    print(f"self-test passed ({len(results)} checks; repacked: {' '.join(packed) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
