"""llama.cpp as the reference the benchmarks measure porter against, in the same run.

Two pieces of stock llama.cpp, both from the ``llama-cpp-python`` package (``make bench``
installs it, built for AVX2 with the AMX kernels off, which crash on this machine's CPUs):

* the runtime, driven in a child process (``python bench/llamacpp.py speed|logits ...``) so that
  its ggml and porter's never share a process;
* the converter ``convert_hf_to_gguf.py``, from the same version's source archive (downloaded
  once into ``.cache/bench``), run with its own ``gguf-py``.

The benchmarks skip llama.cpp, saying so, when it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # keep in step with the bench extra in pyproject.toml
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "src"  # shared with tools/build_ggml.py
HERE = Path(__file__).resolve()


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _worker(*args: str, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed ({' '.join(args[:2])}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(gguf: Path, ids: list[int], n_gen: int, threads: int, reps: int) -> tuple[float, float]:
    """Median prompt and generation tokens/s of stock llama.cpp on a GGUF (greedy decoding)."""
    r = _worker("speed", str(gguf), json.dumps(ids), str(n_gen), str(threads), str(reps))
    return r["prompt_tps"], r["gen_tps"]


def embed(gguf: Path, text: str, threads: int) -> list[float]:
    """llama.cpp's mean-pooled sentence embedding (its own tokenizer, from the GGUF's vocabulary)."""
    return _worker("embed", str(gguf), text, str(threads))["embedding"]


def system_info() -> str:
    """llama.cpp's own line of the CPU features its build uses."""
    return _worker("info")["system_info"]


def logits(gguf: Path, seqs: list[list[int]], threads: int, out: Path):
    """llama.cpp's logits for every position of each sequence, concatenated (numpy array)."""
    import numpy as np

    seq_file = out.with_suffix(".seqs.json")
    seq_file.write_text(json.dumps(seqs))
    _worker("logits", str(gguf), str(seq_file), str(threads), str(out))
    return np.load(out)


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of a command run in a child process."""
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return seconds, peak_kib / 1024


def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (the source archive of the pinned llama-cpp-python)."""
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} sources for llama.cpp's converter", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{root.name}/vendor/llama.cpp/")
                       and "/vendor/llama.cpp/ggml/" not in m.name]
            tar.extractall(CACHE, members=members, filter="data")
    return script


# -- the child process: the only place llama_cpp is imported ------------------------------------

def _load(gguf: str, threads: int, **kw):
    from llama_cpp import Llama

    return Llama(model_path=gguf, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False, **kw)


def _speed(gguf: str, ids_json: str, n_gen: str, threads: str, reps: str) -> dict:
    import statistics

    import numpy as np

    ids, n = json.loads(ids_json), int(n_gen)
    m = _load(gguf, int(threads))
    n_vocab = m.n_vocab()

    def last_token():  # Llama.eval keeps no logits (unless logits_all): read llama.cpp's own
        return int(np.argmax(np.ctypeslib.as_array(m._ctx.get_logits(), shape=(n_vocab,))))

    m.reset()
    m.eval(ids[:8])  # warm-up
    pp, tg = [], []
    for _ in range(int(reps)):
        m.reset()
        t = time.perf_counter()
        m.eval(ids)
        pp.append(len(ids) / (time.perf_counter() - t))
        tok = last_token()
        t = time.perf_counter()
        for _ in range(n):
            m.eval([tok])
            tok = last_token()
        tg.append(n / (time.perf_counter() - t))
    return {"prompt_tps": statistics.median(pp), "gen_tps": statistics.median(tg)}


def _logits(gguf: str, seq_file: str, threads: str, out: str) -> dict:
    import numpy as np

    m = _load(gguf, int(threads), logits_all=True)
    rows = []
    for seq in json.loads(Path(seq_file).read_text()):
        m.reset()
        m.eval(seq)
        rows.append(np.array(m.scores[: len(seq)], dtype=np.float32))
    np.save(out, np.concatenate(rows))
    return {"rows": sum(len(r) for r in rows)}


def _embed(gguf: str, text: str, threads: str) -> dict:
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    m = Llama(model_path=gguf, embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=512,
              n_threads=int(threads), verbose=False)
    return {"embedding": [float(x) for x in m.embed(text)]}


def _info() -> dict:
    import llama_cpp

    return {"system_info": llama_cpp.llama_print_system_info().decode().strip()}


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    result = {"speed": _speed, "logits": _logits, "embed": _embed, "info": _info}[mode](*rest)
    print(json.dumps(result))
