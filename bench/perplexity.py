"""SmolLM2-135M-Instruct perplexity with llama-perplexity's conventions: porter on f32, q8_0 and q4_k
GGUFs next to transformers on the very same chunks (float32 weights, and the GGUF's dequantized weights).

The text is the Python Language Reference that ships with Python (pydoc_data.topics, PSF license).
Usage:

    python bench/perplexity.py [-c 512] [--chunks 8] [--types f32,q8_0,q4_k,Q4_K_M] [--threads 2]
    python bench/perplexity.py -c 384 --ppl-stride 256 --types f32   # the sliding-window mode

(Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M are made with `porter quantize` from the f32 file.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--types", default="f32,q8_0,q4_k")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-stride", type=int, default=0, help="llama-perplexity's sliding-window mode (0: chunks)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import porter
    from porter.convert.quantize import quantize
    from porter.examples import materialize_smollm2
    from porter.measure.perplexity import (bos_for, chunks_of, perplexity, strided_window, strided_windows,
                                           transformers_perplexity, transformers_strided_perplexity)
    from porter.measure.text import python_reference
    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture, convert

    torch.set_num_threads(args.threads)
    ckpt = materialize_smollm2(progress=False)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    text = python_reference()
    rows = []
    stride = args.ppl_stride
    window = strided_window(args.ctx_size, stride) if stride else args.ctx_size

    def reference(model, tokens, bos):
        if stride:
            return transformers_strided_perplexity(model, strided_windows(tokens, args.ctx_size, stride, args.chunks),
                                                   stride)
        return transformers_perplexity(model, chunks_of(tokens, args.ctx_size, args.chunks, bos))

    with tempfile.TemporaryDirectory() as d:
        for outtype in args.types.split(","):
            gguf = Path(d) / f"smollm2.{outtype}.gguf"
            if outtype.upper() in ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M"):  # llama.cpp's mixes: porter quantize
                f32 = Path(d) / "smollm2.f32-source.gguf"
                if not f32.exists():
                    convert(ckpt, f32, "f32", progress=False)
                quantize(f32, gguf, outtype)
            else:
                convert(ckpt, gguf, outtype, progress=False)
            with porter.load(gguf, n_threads=args.threads, n_ctx=window) as m:
                tokens = m.encode(text)
                bos = bos_for(m)
                t = time.perf_counter()
                r = perplexity(m, tokens, args.ctx_size, n_chunks=args.chunks, bos_id=bos, stride=stride)
                seconds = time.perf_counter() - t
            ref = reference(hf, tokens, bos)
            same = ref
            if outtype != "f32":
                rounded = Path(d) / f"hf-{outtype}"
                checkpoint_with_gguf_weights(ckpt, architecture(ckpt).conversion_plan(), gguf, rounded)
                same = reference(AutoModelForCausalLM.from_pretrained(rounded, dtype=torch.float32).eval(), tokens, bos)
            rows.append((outtype, r.ppl, r.ppl_error, ref, same, seconds))
            print(f"{outtype}: porter {r.ppl:.4f} +/- {r.ppl_error:.4f} ({seconds:.1f} s), transformers f32 {ref:.4f}, "
                  f"transformers on the GGUF's weights {same:.4f}", flush=True)
    if stride:
        print(f"\nSmolLM2-135M-Instruct, Python reference text, -c {args.ctx_size} --ppl-stride {stride}: "
              f"{r.n_chunks} windows of {window} tokens ({r.count} scored tokens)\n")
    else:
        print(f"\nSmolLM2-135M-Instruct, Python reference text, -c {args.ctx_size}, {args.chunks} chunks "
              f"({args.chunks * (args.ctx_size - args.ctx_size // 2 - 1)} scored tokens)\n")
    print("| type | porter PPL | transformers (f32 weights) | transformers (GGUF's weights) | porter vs same weights |")
    print("|---|---|---|---|---|")
    for outtype, ppl, err, ref, same, _ in rows:
        print(f"| {outtype} | {ppl:.4f} +/- {err:.4f} | {ref:.4f} | {same:.4f} | {ppl / same - 1:+.2e} |")


if __name__ == "__main__":
    main()
