"""The speed race: porter against stock llama.cpp's default build, one table of ratios, one run.

Both runtimes run the same GGUF files (written by porter), each loaded once in its own child
process, with the same thread count (the physical cores), the same context size, F16 keys and
values (llama.cpp's default cache type) and flash attention; porter with its defaults too
(weights and KV cache moved onto 2 MiB pages in the background after load: its worker waits for
that before the first measurement, so the move never runs during llama.cpp's turns, and the load
row does not include it, as a user's first token does not wait for it). llama.cpp is the
``llama-cpp-python`` that ``make bench`` builds with llama.cpp's own defaults (native,
llamafile, OpenMP, CPU repacking).

Models: SmolLM2-135M-Instruct (real weights) and a llama of TinyLlama-1.1B's sizes with random
weights (built here from a config: speed does not depend on the values), each in q8_0 and q4_0.
Rows:

* ``load``: seconds from the start of loading to a model ready to run (imports not counted),
  each load in a fresh process;
* ``pp128`` / ``pp512`` / ``pp2048``: prompt tokens/s (batches of 512, as llama.cpp's ubatch);
* ``tg``: decode tokens/s after a 128-token prompt; ``tg@d1024`` / ``tg@d4096``: decode with that
  many tokens already cached (llama-bench's ``-d``);
* ``tg busy``: decode while the bench keeps every core busy with competing processes (q8_0).

Measurements come in pairs: one runtime's, then at once the other's (who goes first
alternates), ``--reps`` pairs per row (``--close-reps`` for pp128 and tg, the rows held to
1.0x). A row's ratio is the median of its pairs' ratios, printed with a 95% bootstrap interval:
on a shared machine speed drifts by 10-20% over minutes, which pairs cancel, and bursts of noise
move single pairs, which the interval shows. The issue's targets are printed next to the
ratios. Usage:

    python bench/race.py [--models smollm2,tinyllama] [--types q8_0,q4_0] [--reps 5] [--close-reps 15] [--quick]
                         [--json run.json] [--from-json run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    """porter's GGUF of a bench model (converted once, kept in .cache/bench; ``by-layer``: written
    layer by layer, as porter has written files since its runtime stacks neighbouring matrices)."""
    path = CACHE / f"{model}.{outtype}.by-layer.gguf"
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


# -- workers: each runtime loaded once in a child process, measurements on request --------------
#
# A measurement of one runtime is followed at once by the same measurement of the other (who
# goes first alternates), so each pair sees the same machine: on a shared VM the speed drifts
# by 10-20% over minutes, and a ratio of runs minutes apart measures the drift. The ratio of a
# row is the median of its pairs' ratios.

class PorterRunner:
    """porter's side of a worker: load, then prompt and decode measurements."""

    def __init__(self, path: str, threads: int):
        import porter
        import porter.runtime.model  # noqa: F401  (imports are not load time, as for llama_cpp)

        t = time.perf_counter()
        ngl = os.environ.get("PORTER_RACE_NGL")  # --ngl: layers on the GPU (porter's -ngl, llama.cpp's n_gpu_layers)
        self.m = porter.load(path, n_threads=threads, n_ctx=N_CTX, cache_type="f16", n_gpu_layers=ngl or None)
        self.load = time.perf_counter() - t
        self.n_vocab = self.m.n_vocab

    def settle(self) -> None:
        """Wait for porter's weights to be on huge pages: the move runs in the background after
        load (load time does not include it) and would take CPU from llama.cpp's measurements."""
        getattr(self.m, "settle", lambda: True)()  # (a --porter-from tree may predate it)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached positions (later ones are masked, then overwritten)."""
        self.m.kv.n_past = n

    def prefill(self, ids) -> int:
        """Evaluate ``ids`` after the cached positions, in batches of 512; the next token (greedy)."""
        logits = None
        for i in range(0, len(ids), 512):
            logits = self.m.forward(ids[i:i + 512])
        return int(np.argmax(logits[-1]))

    def step(self, tok: int) -> int:
        return int(np.argmax(self.m.forward([tok])[-1]))

    def close(self) -> None:
        self.m.close()


class LlamaRunner:
    """llama.cpp's side (llama-cpp-python, its own defaults but for the shared settings)."""

    def __init__(self, path: str, threads: int):
        from llama_cpp import Llama

        t = time.perf_counter()
        ngl = os.environ.get("PORTER_RACE_NGL") or "0"
        self.m = Llama(model_path=path, n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=threads,
                       n_gpu_layers=-1 if ngl == "all" else int(ngl),
                       n_threads_batch=threads, flash_attn=True, verbose=False)
        self.load = time.perf_counter() - t
        self.n_vocab = self.m.n_vocab()

    def settle(self) -> None:  # nothing runs in the background
        pass

    def _next(self) -> int:  # Llama.eval keeps no logits (unless logits_all): read llama.cpp's own
        return int(np.argmax(np.ctypeslib.as_array(self.m._ctx.get_logits(), shape=(self.n_vocab,))))

    def truncate(self, n: int) -> None:
        self.m.n_tokens = n  # Llama.eval drops the cache from n_tokens on

    def prefill(self, ids) -> int:
        self.m.eval(ids)
        return self._next()

    def step(self, tok: int) -> int:
        self.m.eval([tok])
        return self._next()

    def close(self) -> None:
        self.m.close()


def serve(runtime: str, path: str, threads: str) -> None:
    """A worker: load, say how long it took, then answer one JSON request per line
    (``["pp", n]``: prompt tokens/s; ``["depth", d]``: cache d prompt tokens, untimed;
    ``["tg", n, d]``: decode tokens/s of n steps after the first d cached positions)."""
    runner = (PorterRunner if runtime == "porter" else LlamaRunner)(path, int(threads))
    print(json.dumps({"load": runner.load}), flush=True)
    ids = prompt_ids(N_CTX - 64, runner.n_vocab)
    runner.prefill(ids[:8])  # warm-up
    runner.settle()
    for line in sys.stdin:
        req = json.loads(line)
        out = 0.0
        if req[0] == "quit":
            break
        if req[0] == "pp":
            n = req[1]
            runner.truncate(0)
            t = time.perf_counter()
            runner.prefill(ids[:n])
            out = n / (time.perf_counter() - t)
        elif req[0] == "depth":
            runner.truncate(0)
            runner.next_token = runner.prefill(ids[:req[1]])
        else:  # tg: every request decodes from the same cached depth
            n, depth = req[1], req[2]
            runner.truncate(depth)
            tok = runner.step(runner.next_token)  # untimed: the first step builds the decode graph
            t = time.perf_counter()
            for _ in range(n):
                tok = runner.step(tok)
            out = n / (time.perf_counter() - t)
        print(json.dumps({"value": out}), flush=True)
    runner.close()


PORTER_PATH: str | None = None  # --porter-from: another porter tree (e.g. an older commit) to race


class Worker:
    """A runtime loaded in a child process, measured on request."""

    def __init__(self, runtime: str, path: Path, threads: int):
        cmd = [sys.executable, str(HERE), "--worker", runtime, str(path), str(threads)]
        env = dict(os.environ, PYTHONPATH=PORTER_PATH) if runtime == "porter" and PORTER_PATH else None
        self.name = runtime
        # its messages go to a file, read if it fails: a pipe nobody reads would stall it once full
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        self.load = self._reply()["load"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise RuntimeError(f"{self.name} worker failed:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def ask(self, *request) -> float:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()["value"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps(["quit"]) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        self.log.close()


def load_times(path: Path, threads: int, reps: int) -> dict:
    """Seconds to load, each runtime in a fresh process, alternated."""
    got = {"porter": [], "llama": []}
    for r in range(reps):
        for runtime in (("porter", "llama") if r % 2 == 0 else ("llama", "porter")):
            w = Worker(runtime, path, threads)
            got[runtime].append(w.load)
            w.close()
    return got


SETTLE = 0.25  # seconds between measurements: llama.cpp's OpenMP threads spin a few ms after a graph


def measure(workers: list[Worker], request: tuple, reps: int) -> dict[str, list[float]]:
    """``reps`` pairs of one measurement; which runtime goes first alternates. Each starts on a
    settled machine: right after a graph, llama.cpp's OpenMP workers keep spinning for some
    milliseconds (libgomp's default wait policy), which would take a core from the next
    measurement and, for porter, look like a busy machine to its thread policy."""
    got: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(reps):
        for w in (workers if r % 2 == 0 else workers[::-1]):
            time.sleep(SETTLE)
            got[w.name].append(w.ask(*request))
    return got


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


def median_interval(pairs: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the median of ``pairs`` (fixed seed: the same run prints the same
    interval): how far the row's ratio could move with other draws of the same noise."""
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(np.asarray(pairs), size=(resamples, len(pairs))), axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def report(console, rows: list, threads: int, ngl: str = "") -> None:
    """The table of ratios: per row porter's and llama.cpp's medians, the median of the pairs'
    ratios with its 95% interval, the number of pairs and the issue's target."""
    from rich.table import Table

    table = Table(title=f"porter vs stock llama.cpp (default build), {threads} threads, F16 KV cache, flash "
                        f"attention; medians of measurement pairs"
                        + (f", -ngl {ngl} (GPU)" if ngl not in ("", "0") else ""))
    for col in ("model", "weights", "row", "porter", "llama.cpp", "ratio", "95% CI", "pairs", "target"):
        table.add_column(col, justify="right")
    for model, outtype, name, ours, theirs, _higher in rows:
        # pair by pair, porter's measurement over llama.cpp's next to it (speeds: > 1 porter
        # ahead; times: porter's time over llama.cpp's); the row's ratio is their median
        pairs = [p / q for p, q in zip(ours, theirs)]
        ratio = statistics.median(pairs)
        key = name.split(" (")[0]
        if name == "load s":
            target, met = "<= 2x", ratio <= 2
        else:
            target, met = (f">= {TARGETS[key]:.1f}x", ratio >= TARGETS[key]) if key in TARGETS else ("", None)
        mark = "" if met is None else (" ok" if met else " MISSED")
        fmt = "{:.3f}" if name == "load s" else "{:.1f}"
        shown = f"{ratio:.2f}x time" if name == "load s" else f"{ratio:.2f}x"
        interval = "{:.2f}-{:.2f}".format(*median_interval(pairs)) if len(pairs) > 2 else ""
        table.add_row(model, outtype, name, fmt.format(statistics.median(ours)), fmt.format(statistics.median(theirs)),
                      shown, interval, str(len(pairs)), target + mark)
    console.print(table)
    console.print("ratio: the median of the pairs' ratios (porter / llama.cpp for speeds, so > 1 is porter ahead; "
                  "porter's time / llama.cpp's for load); 95% CI: a bootstrap interval of that median over the "
                  "pairs (where the ratio could land with other draws of this machine's noise)")


def machine_load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,tinyllama")
    ap.add_argument("--types", default="q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=5, help="measurement pairs per row (default 5)")
    ap.add_argument("--close-reps", type=int, default=15,
                    help="pairs for the rows held to 1.0x (pp128, tg; default 15): short rows, where the two "
                         "runtimes run the same kernels and a median of 5 pairs moves by +-5%% between runs")
    ap.add_argument("--threads", type=int, default=0, help="default: the physical cores")
    ap.add_argument("--quick", action="store_true", help="no long-context rows")
    ap.add_argument("--no-busy", action="store_true", help="no rows under competition")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--ngl", default=None, help="layers on the GPU for both runtimes (N or all; default: all when "
                    "porter's ggml reports a GPU, else none). llama.cpp must be a GPU build too: see the Makefile")
    ap.add_argument("--porter-from", help="race the porter found in this source tree (before/after numbers)")
    ap.add_argument("--from-json", type=Path, help="print the table of a run saved with --json (no measuring)")
    ap.add_argument("--worker", nargs=3, metavar=("RUNTIME", "GGUF", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(*args.worker)
        return

    from rich.console import Console

    console = Console(width=120)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report(console, saved["rows"], saved["threads"], saved.get("ngl", ""))
        return
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
    rows = []  # (model, type, row, porter's measurements, llama.cpp's, higher is better)
    loads = [machine_load()]
    for model in args.models.split(","):
        for outtype in args.types.split(","):
            path = gguf_file(model, outtype)
            path.read_bytes()  # page cache warm for both runtimes
            got = load_times(path, threads, args.reps)
            rows.append((model, outtype, "load s", got["porter"], got["llama"], False))
            workers = [Worker("porter", path, threads), Worker("llama", path, threads)]
            try:
                for name, kind, n, depth in tests:
                    if kind == "tg":
                        for w in workers:
                            w.ask("depth", depth)
                    reps = max(args.reps, args.close_reps) if TARGETS.get(name) == 1.0 else args.reps
                    got = measure(workers, (kind, n) if kind == "pp" else (kind, n, depth), reps)
                    rows.append((model, outtype, name, got["porter"], got["llama"], True))
                    loads.append(machine_load())
                if outtype == "q8_0" and not args.no_busy:
                    # decode while every core is busy with another process
                    for w in workers:
                        w.ask("depth", 128)
                    with Competition(physical_cores()):
                        got = measure(workers, ("tg", 32, 128), max(3, args.reps))
                    rows.append((model, outtype, f"tg busy ({physical_cores()} competing)", got["porter"],
                                 got["llama"], True))
                    loads.append(machine_load())
            finally:
                for w in workers:
                    w.close()

    from porter.runtime._lib import GGML_VERSION, build_info, cpu_features

    report(console, rows, threads, args.ngl)
    info = build_info()
    if PORTER_PATH:
        console.print(f"porter: the tree in {PORTER_PATH} (with whatever ggml it loads)")
    else:
        console.print(f"porter: ggml {GGML_VERSION} {info.get('variant', '?')} build ({' '.join(cpu_features())})")
    console.print(f"llama.cpp: {llamacpp.system_info()}")
    console.print(f"machine load average (1/5/15 min) before and after each row: {' | '.join(loads)}")
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "ngl": args.ngl, "rows": rows, "loads": loads}, indent=1))


if __name__ == "__main__":
    main()
