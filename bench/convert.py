"""Conversion time and peak memory: `porter convert` vs llama.cpp's convert_hf_to_gguf.py.

Both convert SmolLM2-135M-Instruct, one after the other in child processes, and the table gives
wall time (process start to exit, imports included) and peak resident memory, with ratios.
DESIGN's target: no slower than llama.cpp's converter and much less memory. Usage:

    python bench/convert.py [--types f32,q8_0] [--reps 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import llamacpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f32,q8_0")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from porter.examples import materialize_smollm2

    ckpt = materialize_smollm2()
    porter_cli = str(Path(sys.executable).parent / "porter")
    script = llamacpp.converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    table = Table(title="Converting SmolLM2-135M-Instruct (wall time incl. imports, peak memory; "
                        f"median of {args.reps})")
    for col in ("type", "porter s", "llama.cpp s", "time ratio", "porter MiB", "llama.cpp MiB", "memory ratio"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types.split(","):
            ours, theirs = [], []
            for _ in range(args.reps):
                out = Path(tmp) / f"porter.{outtype}.gguf"
                ours.append(llamacpp.measured([porter_cli, "convert", str(ckpt), "-o", str(out), "-t", outtype,
                                               "--force", "--quiet"]))
                out = Path(tmp) / f"llama.{outtype}.gguf"
                theirs.append(llamacpp.measured([sys.executable, str(script), str(ckpt), "--outtype", outtype,
                                                 "--outfile", str(out)], env=env))
            (ps, pm), (ls, lm) = ([statistics.median(x) for x in zip(*r)] for r in (ours, theirs))
            table.add_row(outtype, f"{ps:.1f}", f"{ls:.1f}", f"{ps / ls:.2f}", f"{pm:.0f}", f"{lm:.0f}", f"{pm / lm:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
