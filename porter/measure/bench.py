"""Prompt and generation speed with llama-bench's conventions (llama.cpp ``tools/llama-bench``).

- Tests: ``pp<N>`` runs a prompt of N tokens (in batches of ``n_batch``) from an empty cache;
  ``tg<N>`` generates N tokens one at a time from an empty cache (no sampling: each step feeds a
  random token, as llama-bench does). The first token is BOS when the model adds one, the others
  random ids. ``pp<P>+tg<G>`` (``-pg P,G``) runs the prompt, then generates G tokens after it in the
  same cache, and its t/s counts P + G tokens over the whole run. Each test runs once to warm up
  (graphs built, weights touched), then ``reps`` times.
- t/s of a run is its tokens divided by its wall time; the table shows the mean ± the sample
  standard deviation over the runs.
- Rows are in llama-bench's order: for each thread count, the pp tests, then the tg tests, then
  the pg tests.
- ``threads`` is the count asked for (``-t``); porter's adaptive thread policy may run a graph on
  fewer while other processes hold cores (``PORTER_ADAPTIVE_THREADS=0`` turns it off).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from porter.errors import ModelError, OptionError


@dataclass
class BenchResult:
    """One row of the table: a test (``n_prompt`` and ``n_gen`` tokens) at ``n_threads``, with the
    wall time of each run in ``samples_ns``; the rest describes the model as llama-bench does."""

    model_filename: str
    model_type: str  # "llama 135M Q8_0", as llama-bench describes a model
    model_size: int  # bytes of the tensors
    model_n_params: int
    backends: str
    n_threads: int
    n_batch: int
    n_prompt: int
    n_gen: int
    samples_ns: list[int] = field(default_factory=list)

    @property
    def test(self) -> str:
        """llama-bench's test name: ``pp512``, ``tg128`` or ``pp512+tg128``."""
        if self.n_prompt and self.n_gen:
            return f"pp{self.n_prompt}+tg{self.n_gen}"
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"

    @property
    def samples_ts(self) -> list[float]:
        """Tokens per second of each run (prompt and generated tokens over the run's wall time)."""
        n = self.n_prompt + self.n_gen
        return [n * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        """The mean of :attr:`samples_ts`."""
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        """The sample standard deviation of :attr:`samples_ts` (0 for a single run)."""
        return statistics.stdev(self.samples_ts) if len(self.samples_ns) > 1 else 0.0

    def record(self) -> dict:
        """The fields llama-bench's CSV and JSON outputs use for these values."""
        out = asdict(self)
        out.update(test=self.test, avg_ns=int(statistics.fmean(self.samples_ns)),
                   stddev_ns=int(statistics.stdev(self.samples_ns)) if len(self.samples_ns) > 1 else 0,
                   avg_ts=self.avg_ts, stddev_ts=self.stddev_ts, samples_ts=self.samples_ts)
        return out


def parse_list(text: str, option: str, minimum: int) -> list[int]:
    """llama-bench's comma-separated values (``-p 128,512``)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{option} {text}: give whole numbers separated by commas (e.g. 128,512)") from None
    if not values or any(v < minimum for v in values):
        raise OptionError(f"{option} {text}: every value must be >= {minimum}")
    return values


def parse_pairs(texts, option: str = "-pg") -> list[tuple[int, int]]:
    """llama-bench's ``-pg P,G`` values (the option may be given several times): (prompt, generated)
    token counts, both >= 0; a pair of two zeros is skipped, as llama-bench skips it."""
    pairs = []
    for text in texts:
        parts = str(text).split(",")
        try:
            p, g = (int(v) for v in parts)
        except ValueError:
            raise OptionError(f"{option} {text}: give two whole numbers, prompt and generated tokens (e.g. 512,128)") \
                from None
        if p < 0 or g < 0:
            raise OptionError(f"{option} {text}: both values must be >= 0")
        if p or g:
            pairs.append((p, g))
    return pairs


def describe(path: Path) -> tuple[str, int, int]:
    """(model type as llama-bench prints it, tensor bytes, parameter count) from the GGUF header."""
    from gguf import LlamaFileType

    from porter.runtime.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        arch = f.get("general.architecture") or "?"
        file_type = f.get("general.file_type")
        size = sum(t.nbytes for t in f.tensors.values())
        params = sum(int(np.prod(t.ne, dtype=np.int64)) for t in f.tensors.values())
    try:
        ftype = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        ftype = "?"
    return f"{arch} {_params_label(params)} {ftype}", size, params


def _params_label(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.0f}{unit}" if n / div >= 10 else f"{n / div:.1f}{unit}"
    return str(n)


def _prompt(model, n: int, rng) -> list[int]:
    ids = rng.integers(0, model.n_token_rows, size=n).tolist()
    bos = model.metadata.get("bos_token_id")
    if model.metadata.get("add_bos_token") and bos is not None and ids:
        ids[0] = int(bos)
    return ids


def _run_prompt(model, ids: list[int], n_batch: int) -> None:
    model.reset()
    for s in range(0, len(ids), n_batch):
        model.forward(ids[s:s + n_batch])


def _run_gen(model, ids: list[int], reset: bool = True) -> None:
    if reset:
        model.reset()
    for tok in ids:
        model.forward([tok])


def _run_prompt_gen(model, prompt: list[int], gen: list[int], n_batch: int) -> None:
    _run_prompt(model, prompt, n_batch)
    _run_gen(model, gen, reset=False)  # after the prompt, in the same cache


def bench(path: Path, n_prompt: list[int], n_gen: list[int], reps: int, threads: list[int],
          n_batch: int = 2048, seed: int = 0, on_result=None,
          n_pg: list[tuple[int, int]] = ()) -> list[BenchResult]:
    """Load the GGUF at ``path`` once, then run every test at every thread count (see the module
    docstring): ``n_prompt`` (``-p``), ``n_gen`` (``-n``) and ``n_pg`` ((prompt, generated) pairs,
    ``-pg``) token counts, ``reps`` runs each, at each count in ``threads``, prompts in batches of
    ``n_batch``; ``on_result(row)`` is called as each test ends. Returns the rows in table order."""
    import porter

    path = Path(path)
    if reps < 1:
        raise OptionError(f"-r {reps}: give at least 1 repetition")
    tests = ([(p, 0) for p in n_prompt if p > 0] + [(0, g) for g in n_gen if g > 0]
             + [(p, g) for p, g in n_pg if p or g])
    if not tests:
        raise OptionError("nothing to measure: give -p, -n or -pg values above 0")
    model_type, size, params = describe(path) if path.is_file() else ("?", 0, 0)
    rng = np.random.default_rng(seed)
    results = []
    n_ctx = max(p + g for p, g in tests)
    with porter.load(path, n_threads=threads[0], n_ctx=max(n_ctx, 2)) as m:
        if not m.spec.causal:
            raise ModelError("bench measures causal language models (this graph is an encoder)")
        if m.n_ctx < n_ctx:
            raise OptionError(f"a test needs {n_ctx} positions, the model holds {m.n_ctx}; lower -p / -n")
        for t in threads:
            m.backend.set_threads(t)
            for p, g in tests:
                prompt, gen = _prompt(m, p, rng), _prompt(m, g, rng)  # each starts with BOS, as llama-bench's
                if p and g:
                    run = lambda: _run_prompt_gen(m, prompt, gen, n_batch)  # noqa: E731
                elif p:
                    run = lambda: _run_prompt(m, prompt, n_batch)  # noqa: E731
                else:
                    run = lambda: _run_gen(m, gen)  # noqa: E731
                run()  # warm-up
                r = BenchResult(path.name, model_type, size, params, "CPU", t, n_batch, p, g)
                for _ in range(reps):
                    t0 = time.perf_counter_ns()
                    run()
                    r.samples_ns.append(time.perf_counter_ns() - t0)
                m.reset()
                results.append(r)
                if on_result is not None:
                    on_result(r)
    return results


_COLUMNS = ("model", "size", "params", "backend", "threads", "test", "t/s")


def _cells(r: BenchResult) -> tuple[str, ...]:
    return (r.model_type, f"{r.model_size / 2**30:.2f} GiB" if r.model_size >= 2**30 else f"{r.model_size / 2**20:.2f} MiB",
            _params_label(r.model_n_params), r.backends, str(r.n_threads), r.test,
            f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}")


def markdown(results: list[BenchResult]) -> str:
    """llama-bench's markdown table (``-o md``) of ``results``."""
    rows = [_COLUMNS] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    right = {1, 2, 4, 5, 6}  # numbers right-aligned, as llama-bench prints them

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]]) + "\n"


_FIELDS = ("model_filename", "model_type", "model_size", "model_n_params", "backends", "n_threads", "n_batch",
           "n_prompt", "n_gen", "test", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts")


def to_csv(results: list[BenchResult]) -> str:
    """llama-bench's CSV output (``-o csv``): a header, then a line per result."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.record())
    return buf.getvalue()


def to_json(results: list[BenchResult]) -> str:
    """llama-bench's JSON output (``-o json``): a list of records, with each run's ns and t/s."""
    return json.dumps([{k: r.record()[k] for k in (*_FIELDS, "samples_ns", "samples_ts")} for r in results], indent=2) + "\n"


__all__ = ["BenchResult", "bench", "describe", "markdown", "parse_list", "parse_pairs", "to_csv", "to_json"]
