"""Measure which transformers causal LMs port through the traced path, and how well.

``python -m porter.traced.coverage TYPE`` ports one tiny random model of TYPE and prints one JSON
line: ``status`` (ported | gap | export | error), the f32 logits NMSE against transformers, the
KV-cache check (prefill + decode against transformers), and for gaps the op-gap report's first
line. ``python -m porter.traced.coverage --all [-j N] [--json FILE]`` runs every text causal-LM
type of the installed transformers, each in its own process (a time limit each), and prints
the table; ``--update-readme`` puts the result in the README (``--from-json FILE`` renders an
earlier run's results without measuring again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GATE = 1e-6
TIME_LIMIT = 900  # seconds per type


def measure(model_type: str, seed: int = 0) -> dict:
    """Port a tiny random model of ``model_type`` through the traced path and compare it."""
    import numpy as np

    from porter.parity.logits import hf_logits
    from porter.parity.metrics import nmse
    from porter.testing.parity import port_tiny_traced, stepped_logits
    from porter.traced.export import ExportFailed
    from porter.traced.port import OpGaps

    t0 = time.perf_counter()
    out: dict = {"model_type": model_type}
    with tempfile.TemporaryDirectory(prefix="porter-cov-") as tmp:
        try:
            pair = port_tiny_traced(model_type, directory=Path(tmp), seed=seed)
        except OpGaps as exc:
            out.update(status="gap", gap=exc.report.first_line, report=exc.report.as_dict())
            return _done(out, t0)
        except ExportFailed as exc:
            out.update(status="export", gap=str(exc)[:400])
            return _done(out, t0)
        except Exception as exc:  # noqa: BLE001 - recorded, not raised: this is a survey
            out.update(status="error", gap=f"{type(exc).__name__}: {str(exc)[:400]}", where=_where(exc))
            return _done(out, t0)
        with pair:
            try:
                vocab = pair.porter.n_vocab
                ids = [int(i) for i in np.random.default_rng(seed).integers(0, vocab, 24)]
                ref = hf_logits(pair.hf, ids)
                got = pair.porter.logits(ids)
                cached = stepped_logits(pair.porter, ids, 9)
                e, ec = float(nmse(ref, got)), float(nmse(ref, cached))
                spec = pair.porter.spec
                out.update(nmse=e, cache_nmse=ec, layers=spec.produced_by.get("layers"),
                           export=spec.produced_by.get("export"),
                           status="ported" if e <= GATE and ec <= GATE else "mismatch")
            except Exception as exc:  # noqa: BLE001
                out.update(status="error", gap=f"{type(exc).__name__}: {str(exc)[:400]}")
    return _done(out, t0)


def _where(exc: BaseException) -> str:
    """file:line of the innermost porter frame of a traceback (for the survey's error column)."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/porter/" in f.filename]
    f = frames[-1] if frames else None
    return f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else ""


def _done(out: dict, t0: float) -> dict:
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_all(types: list[str], jobs: int = 2, limit: int = TIME_LIMIT, progress: bool = True) -> list[dict]:
    """Measure every type in its own process (a crash or hang costs only that type)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")

    def one(t: str) -> dict:
        try:
            r = subprocess.run([sys.executable, "-m", "porter.traced.coverage", t], capture_output=True, text=True,
                               timeout=limit, env=env)
        except subprocess.TimeoutExpired:
            return {"model_type": t, "status": "error", "gap": f"timed out after {limit} s"}
        for line in reversed(r.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model_type": t, "status": "error", "gap": f"exit {r.returncode}: {tail[:300]}"}

    results = []
    with ThreadPoolExecutor(jobs) as pool:
        for r in pool.map(one, types):
            results.append(r)
            if progress:
                print(_line(r), file=sys.stderr, flush=True)
    return results


def _line(r: dict) -> str:
    if r["status"] in ("ported", "mismatch"):
        return f"{r['model_type']:24s} {r['status']:8s} NMSE {r['nmse']:.1e} cache {r['cache_nmse']:.1e} ({r.get('seconds')} s)"
    return f"{r['model_type']:24s} {r['status']:8s} {r.get('gap', '')[:150]}"


README_START, README_END = "<!-- traced-coverage:start -->", "<!-- traced-coverage:end -->"
_STATUS = {"ported": "ported", "mismatch": "ported, parity fails", "gap": "op gap", "export": "torch.export fails",
           "error": "error"}


def markdown(results: list[dict]) -> str:
    """The README block: the count, the ported types, and one row per type that does not port."""
    import transformers

    ported = sorted((r for r in results if r["status"] == "ported"), key=lambda r: r["model_type"])
    exported = sum(r["status"] != "export" for r in results)
    lines = [f"**{len(ported)} of {len(results)}** text causal-LM types of transformers {transformers.__version__} "
             f"port through the traced path ({len(ported) / max(exported, 1):.0%} of the {exported} that torch.export "
             f"does not refuse): f32 logits and KV-cache decoding within NMSE {GATE:g} of transformers "
             "on a tiny random model (measured NMSE in brackets):", "",
             ", ".join(f"`{r['model_type']}` ({max(r['nmse'], r['cache_nmse']):.0e})" for r in ported), "",
             "| model type | outcome | first gap |", "|---|---|---|"]
    for r in sorted((r for r in results if r["status"] != "ported"), key=lambda r: (r["status"], r["model_type"])):
        gap = r.get("gap") or (f"NMSE {r['nmse']:.1e}, cache {r['cache_nmse']:.1e}" if "nmse" in r else "")
        gap = " ".join(gap.split())[:140].replace("|", "\\|")
        lines.append(f"| {r['model_type']} | {_STATUS.get(r['status'], r['status'])} | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from porter.traced.tiny import causal_lm_types

    ap = argparse.ArgumentParser(prog="python -m porter.traced.coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("types", nargs="*", help="model types (default with --all: every text causal LM)")
    ap.add_argument("--all", action="store_true", help="every text causal-LM type of the installed transformers")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--from-json", type=Path, help="results of an earlier run (measure nothing)")
    ap.add_argument("--update-readme", action="store_true", help="write the coverage block into README.md")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        if not args.update_readme:
            print(markdown(results))
    elif len(args.types) == 1 and not args.all:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        print(json.dumps(measure(args.types[0])), flush=True)
        return 0
    else:
        results = run_all(args.types or causal_lm_types(), args.jobs)
        ported = sum(r["status"] == "ported" for r in results)
        print(f"{ported} of {len(results)} ported (f32 logits and KV cache NMSE <= {GATE:g})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.update_readme:
        from porter.support import replace_block

        replace_block(README_START, README_END, markdown(results))
    return 0

if __name__ == "__main__":
    sys.exit(main())
