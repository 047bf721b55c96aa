"""Prompt (128 tokens) and generation (64 tokens) speed of porter vs transformers and llama.cpp on SmolLM2.

transformers and porter run in this process, llama.cpp (when installed: `make bench` does it)
in a child process on the very GGUF files porter wrote, one after the other on the same threads,
so the printed ratios compare like with like on a noisy machine. Usage:

    python bench/smollm2.py [--threads 2] [--types f32,bf16,q8_0,q4_0] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import llamacpp


def bench_transformers(model, ids: list[int], n_gen: int, reps: int) -> tuple[float, float]:
    import torch

    prompt = torch.tensor([ids])
    pp, tg = [], []
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            out = model(prompt, use_cache=True)
            pp.append(len(ids) / (time.perf_counter() - t))
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(n_gen):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            tg.append(n_gen / (time.perf_counter() - t))
    return statistics.median(pp), statistics.median(tg)


def bench_porter(m, ids: list[int], n_gen: int, reps: int) -> tuple[float, float]:
    pp, tg = [], []
    m.reset()
    m.forward(ids[:8])  # warm-up
    for _ in range(reps):
        m.reset()
        t = time.perf_counter()
        logits = m.forward(ids)
        pp.append(len(ids) / (time.perf_counter() - t))
        tok = int(np.argmax(logits[-1]))
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(m.forward([tok])[-1]))
        tg.append(n_gen / (time.perf_counter() - t))
    return statistics.median(pp), statistics.median(tg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.examples import materialize_smollm2
    from porter.parity.logits import load_reference
    from porter.pipeline import convert

    torch.set_num_threads(args.threads)
    ckpt = materialize_smollm2()
    hf, tok = load_reference(ckpt)
    text = "The history of the printing press begins in the fifteenth century. " * 40
    ids = tok(text)["input_ids"][: args.prompt_tokens]
    rows = []
    ref_pp, ref_tg = bench_transformers(hf, ids, args.gen_tokens, args.reps)
    rows.append(("transformers", "float32", ref_pp, ref_tg))
    versus = []  # (type, porter / llama.cpp prompt, porter / llama.cpp generation)
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types.split(","):
            path = Path(tmp) / f"smollm2.{outtype}.gguf"
            convert(ckpt, path, outtype, progress=False)
            with porter.load(path, n_threads=args.threads, n_ctx=512) as m:
                pp, tg = bench_porter(m, ids, args.gen_tokens, args.reps)
            rows.append(("porter", outtype, pp, tg))
            if llamacpp.available():  # on the same file porter just ran
                lpp, ltg = llamacpp.speed(path, ids, args.gen_tokens, args.threads, args.reps)
                rows.append(("llama.cpp", outtype, lpp, ltg))
                versus.append((outtype, pp / lpp, tg / ltg))
    table = Table(title=f"SmolLM2-135M-Instruct, {len(ids)}-token prompt, {args.gen_tokens} generated, "
                        f"{args.threads} threads, median of {args.reps}")
    for col in ("runtime", "weights", "prompt tok/s", "x transformers", "generate tok/s", "x transformers"):
        table.add_column(col, justify="right")
    for name, outtype, pp, tg in rows:
        table.add_row(name, outtype, f"{pp:.1f}", f"{pp / ref_pp:.2f}", f"{tg:.1f}", f"{tg / ref_tg:.2f}")
    from porter.runtime._lib import cpu_features

    console = Console()
    console.print(table)
    console.print(f"porter's ggml uses: {' '.join(cpu_features())}")
    if llamacpp.available():
        console.print(f"llama.cpp: {llamacpp.system_info()}")
    for outtype, vpp, vtg in versus:
        console.print(f"porter / llama.cpp, {outtype}: prompt {vpp:.2f}x, generation {vtg:.2f}x")
    if not llamacpp.available():
        console.print("llama.cpp not measured: llama-cpp-python is not installed (`make bench` installs it)")


if __name__ == "__main__":
    main()
