"""The speed race: porter against stock llama.cpp's default build, one table of ratios, one run.

Both runtimes run the same GGUF files (written by porter), each in its own child process, one
after the other for every row and every round (porter, llama.cpp, porter, llama.cpp, ...), with
the same thread count (the physical cores), the same context size, F16 keys and values (llama.cpp's
default cache type) and flash attention. llama.cpp is the ``llama-cpp-python`` that ``make bench``
builds with llama.cpp's own defaults (native, llamafile, OpenMP, CPU repacking).

Models: SmolLM2-135M-Instruct (real weights) and a llama of TinyLlama-1.1B's sizes with random
weights (built here from a config: speed does not depend on the values), each in q8_0 and q4_0.
Rows:

* ``load``: seconds from the start of loading to a model ready to run (imports not counted);
* ``pp128`` / ``pp512`` / ``pp2048``: prompt tokens/s (batches of 512, as llama.cpp's ubatch);
* ``tg``: decode tokens/s after a 128-token prompt; ``tg@d1024`` / ``tg@d4096``: decode with that
  many tokens already cached (llama-bench's ``-d``);
* ``tg busy``: decode while the bench keeps every core busy with competing processes.

Each cell is the best of ``--reps`` rounds (the least disturbed run on a shared machine; ``--stat
median`` for medians); the ``rounds`` column gives the range of the round-by-round ratios (each
porter run against the llama.cpp run right after it), which says how much of a ratio is the
machine's noise. The issue's targets are printed next to the ratios. Usage:

    python bench/race.py [--models smollm2,tinyllama] [--types q8_0,q4_0] [--reps 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import llamacpp

HERE = Path(__file__).resolve()
CACHE = HERE.parent.parent / ".cache" / "bench"
# TinyLlama-1.1B's sizes (its config.json), a long enough context for the depth rows
TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
             "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
TARGETS = {"pp128": 1.0, "tg": 1.0, "pp2048": 0.9, "tg@d4096": 0.9, "tg busy": 1.0}
N_CTX = 4096 + 256


def physical_cores() -> int:
    try:
        from porter.runtime.core import physical_cores as cores
    except ImportError:  # an older porter
        return len(os.sched_getaffinity(0))
    return cores()


# -- models -----------------------------------------------------------------------------------

def tinyllama_checkpoint() -> Path:
    """A TinyLlama-1.1B-shaped llama checkpoint with random bf16 weights (written once)."""
    out = CACHE / "tinyllama-1.1b-shape"
    if (out / "model.safetensors").exists():
        return out
    print("writing a random TinyLlama-1.1B-shaped checkpoint (once)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    c = TINYLLAMA
    d, f, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    rng = np.random.default_rng(0)

    def rand(*shape):  # bf16 bits of N(0, 0.02) values, as transformers initializes llama
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
        return ((x + 0x8000) >> 16).astype(np.uint16)

    def ones(n):
        return np.full(n, 0x3F80, np.uint16)  # bf16 1.0

    tensors = {"model.embed_tokens.weight": rand(c["vocab_size"], d), "model.norm.weight": ones(d),
               "lm_head.weight": rand(c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": ones(d), p + "post_attention_layernorm.weight": ones(d),
                        p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                        p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                        p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                        p + "mlp.down_proj.weight": rand(d, f)})
    # written by hand: safetensors' numpy API has no bfloat16 dtype
    names = sorted(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        a = tensors[name]
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = out / "model.tmp"
    with open(tmp, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for name in names:
            fh.write(tensors[name].tobytes())
    tmp.rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(TINYLLAMA, indent=1))
    return out


def gguf_file(model: str, outtype: str) -> Path:
    """porter's GGUF of a bench model (converted once, kept in .cache/bench)."""
    path = CACHE / f"{model}.{outtype}.gguf"
    if path.exists():
        return path
    from porter.pipeline import convert

    if model == "smollm2":
        from porter.examples import materialize_smollm2

        ckpt = materialize_smollm2()
    else:
        ckpt = tinyllama_checkpoint()
    print(f"converting {model} to {outtype} (once)", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    convert(ckpt, path, outtype, progress=False)
    return path


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    """A fixed pseudo-random prompt (speed does not depend on which tokens)."""
    return [int(x) for x in np.random.default_rng(1).integers(3, n_vocab, n)]


# -- workers: one child process per measurement --------------------------------------------------

def _porter_worker(path: str, tests_json: str, threads: str) -> dict:
    t0 = time.perf_counter()
    import porter
    import porter.runtime.model  # noqa: F401  (imports are not load time, as for llama_cpp)

    imported = time.perf_counter()
    ngl = os.environ.get("PORTER_RACE_NGL")  # --ngl: layers on the GPU (porter's -ngl, llama.cpp's n_gpu_layers)
    m = porter.load(path, n_threads=int(threads), n_ctx=N_CTX, cache_type="f16", n_gpu_layers=ngl or None)
    loaded = time.perf_counter()
    out = {"load": loaded - imported, "import": imported - t0}

    def prefill(ids):
        logits = None
        for i in range(0, len(ids), 512):
            logits = m.forward(ids[i:i + 512])
        return logits

    for name, kind, n, depth in json.loads(tests_json):
        ids = prompt_ids(max(n, depth, 8), m.n_vocab)
        m.reset()
        m.forward(ids[:8])  # warm-up: graphs for this shape
        m.reset()
        if kind == "pp":
            t = time.perf_counter()
            prefill(ids[:n])
            out[name] = n / (time.perf_counter() - t)
        else:
            logits = prefill(ids[:depth])
            tok = int(np.argmax(logits[-1]))
            tok = int(np.argmax(m.forward([tok])[-1]))  # the first step builds the decode graph
            t = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(m.forward([tok])[-1]))
            out[name] = n / (time.perf_counter() - t)
    m.close()
    return out


def _llama_worker(path: str, tests_json: str, threads: str) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    ngl = os.environ.get("PORTER_RACE_NGL") or "0"
    m = Llama(model_path=path, n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=int(threads),
              n_gpu_layers=-1 if ngl == "all" else int(ngl),
              n_threads_batch=int(threads), flash_attn=True, verbose=False)
    out = {"load": time.perf_counter() - t}
    n_vocab = m.n_vocab()

    def last_token():  # Llama.eval keeps no logits (unless logits_all): read llama.cpp's own
        return int(np.argmax(np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n_vocab,))))

    for name, kind, n, depth in json.loads(tests_json):
        ids = prompt_ids(max(n, depth, 8), n_vocab)
        m.reset()
        m.eval(ids[:8])
        m.reset()
        if kind == "pp":
            t = time.perf_counter()
            m.eval(ids[:n])
            out[name] = n / (time.perf_counter() - t)
        else:
            m.eval(ids[:depth])
            tok = last_token()
            m.eval([tok])
            tok = last_token()
            t = time.perf_counter()
            for _ in range(n):
                m.eval([tok])
                tok = last_token()
            out[name] = n / (time.perf_counter() - t)
    return out


PORTER_PATH: str | None = None  # --porter-from: another porter tree (e.g. an older commit) to race


def run_worker(runtime: str, path: Path, tests: list, threads: int) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", runtime, str(path), json.dumps(tests), str(threads)]
    env = dict(os.environ, PYTHONPATH=PORTER_PATH) if runtime == "porter" and PORTER_PATH else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} worker failed on {path.name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Competition:
    """``n`` processes that keep a core busy each (pure Python loops) while the block runs."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        # each stops by itself after 30 minutes or when the bench is gone
        code = ("import os, time\nparent, end = os.getppid(), time.time() + 1800\n"
                "while time.time() < end and os.getppid() == parent:\n    sum(range(1000))\n")
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def paired(got: dict, name: str) -> list[float]:
    """Round by round, porter's measurement over the llama.cpp run right after it, in the unit
    the table shows (speeds: > 1 porter ahead; times: porter's time over llama.cpp's): the
    spread of these says how much of a ratio is the machine's noise."""
    return [p[name] / q[name] for p, q in zip(got["porter"], got["llama.cpp"])]


def machine_load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="default: the physical cores")
    ap.add_argument("--stat", choices=["best", "median"], default="best")
    ap.add_argument("--quick", action="store_true", help="no long-context rows")
    ap.add_argument("--no-busy", action="store_true", help="no rows under competition")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--ngl", default=None, help="layers on the GPU for both runtimes (N or all; default: all when "
                    "porter's ggml reports a GPU, else none). llama.cpp must be a GPU build too: see the Makefile")
    ap.add_argument("--porter-from", help="race the porter found in this source tree (before/after numbers)")
    ap.add_argument("--worker", nargs=4, metavar=("RUNTIME", "GGUF", "TESTS", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        runtime, *rest = args.worker
        print(json.dumps((_porter_worker if runtime == "porter" else _llama_worker)(*rest)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    global PORTER_PATH
    PORTER_PATH = args.porter_from
    threads = args.threads or physical_cores()
    if args.ngl is None:
        from porter.runtime.placement import offload_devices

        args.ngl = "all" if offload_devices() else ""
    os.environ["PORTER_RACE_NGL"] = args.ngl  # the workers read it
    if not llamacpp.available():
        console.print("llama.cpp is not installed (`make bench` installs it): nothing to race")
        return
    tests = [("pp128", "pp", 128, 0), ("tg", "tg", 32, 128)]
    if not args.quick:
        tests += [("pp512", "pp", 512, 0), ("pp2048", "pp", 2048, 0), ("tg@d1024", "tg", 32, 1024),
                  ("tg@d4096", "tg", 32, 4096)]
    pick = max if args.stat == "best" else statistics.median
    rows = []  # (model, type, row, porter, llama.cpp, higher_is_better)
    loads = [machine_load()]
    for model in args.models.split(","):
        for outtype in args.types.split(","):
            path = gguf_file(model, outtype)
            path.read_bytes()  # page cache warm for both runtimes
            got = {"porter": [], "llama.cpp": []}
            for _ in range(args.reps):
                for runtime in ("porter", "llama.cpp"):
                    got[runtime].append(run_worker("porter" if runtime == "porter" else "llama", path, tests, threads))
                loads.append(machine_load())
            rows.append((model, outtype, "load s", min(r["load"] for r in got["porter"]),
                         min(r["load"] for r in got["llama.cpp"]), False, paired(got, "load")))
            for name, *_ in tests:
                rows.append((model, outtype, name, pick([r[name] for r in got["porter"]]),
                             pick([r[name] for r in got["llama.cpp"]]), True, paired(got, name)))
    # decode while every core is busy with another process (SmolLM2 q8_0 and the 1.1B shape q8_0)
    busy_tests = [("tg busy", "tg", 32, 128)]
    for model in [] if args.no_busy else args.models.split(","):
        path = gguf_file(model, "q8_0")
        got = {"porter": [], "llama.cpp": []}
        with Competition(physical_cores()):
            for _ in range(max(2, args.reps)):
                for runtime in ("porter", "llama.cpp"):
                    got[runtime].append(run_worker("porter" if runtime == "porter" else "llama", path, busy_tests,
                                                   threads))
        loads.append(machine_load())
        rows.append((model, "q8_0", f"tg busy ({physical_cores()} competing)",
                     statistics.median([r["tg busy"] for r in got["porter"]]),
                     statistics.median([r["tg busy"] for r in got["llama.cpp"]]), True, paired(got, "tg busy")))

    from porter.runtime._lib import GGML_VERSION, build_info, cpu_features

    table = Table(title=f"porter vs stock llama.cpp (default build), {threads} threads, F16 KV cache, flash "
                        f"attention, {args.stat} of {args.reps} alternated rounds (busy rows: median)"
                        + (f", -ngl {args.ngl} (GPU)" if args.ngl not in ("", "0") else ""))
    for col in ("model", "weights", "row", "porter", "llama.cpp", "ratio", "rounds", "target"):
        table.add_column(col, justify="right")
    for model, outtype, name, ours, theirs, higher, rounds in rows:
        ratio = ours / theirs if higher else theirs / ours  # > 1: porter ahead
        key = name.split(" (")[0]
        target = "<= 2x" if name == "load s" else (f">= {TARGETS[key]:.1f}x" if key in TARGETS else "")
        met = ((ours <= 2 * theirs) if name == "load s" else (ratio >= TARGETS[key] if key in TARGETS else None))
        mark = "" if met is None else (" ok" if met else " MISSED")
        fmt = "{:.3f}" if name == "load s" else "{:.1f}"
        shown = (f"{ours / theirs:.2f}x time" if name == "load s" else f"{ratio:.2f}x")
        spread = f"{min(rounds):.2f}-{max(rounds):.2f}" if len(rounds) > 1 else ""
        table.add_row(model, outtype, name, fmt.format(ours), fmt.format(theirs), shown, spread, target + mark)
    console.print(table)
    info = build_info()
    if PORTER_PATH:
        console.print(f"porter: the tree in {PORTER_PATH} (with whatever ggml it loads)")
    else:
        console.print(f"porter: ggml {GGML_VERSION} {info.get('variant', '?')} build ({' '.join(cpu_features())})")
    console.print(f"llama.cpp: {llamacpp.system_info()}")
    console.print(f"machine load average (1/5/15 min) before, during and after: {' | '.join(loads)}")
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "rows": rows, "loads": loads}, indent=1))


if __name__ == "__main__":
    main()
