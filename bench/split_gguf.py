"""Does stock llama.cpp load porter's split GGUF files, and compute exactly what the unsplit file gives?

SmolLM2-135M-Instruct (the real checkpoint, `porter examples smollm2`) converted by `porter convert`
once whole and once with `--split-max-size` (at least 3 shards), at f32 and q8_0, and requantized
by `porter quantize` into Q4_K_M shards; llama.cpp (llama-cpp-python, in a child process:
bench/llamacpp.py) is given the first shard and finds the others. The logits of every position of
a prompt must be identical (bit for bit) between the split and the unsplit file, in llama.cpp and
in porter; the NMSE between llama.cpp and porter is shown besides. Usage:

    python bench/split_gguf.py [--tiny]   # --tiny: a random 2-layer llama instead (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import llamacpp

IDS = [1, 9690, 28, 253, 2623, 282, 3575, 30, 1023, 1490, 314, 216, 6146, 15, 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2")
    args = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.convert.quantize import output_paths, quantize
    from porter.parity.metrics import nmse
    from porter.pipeline import convert

    console = Console(width=132)
    if not llamacpp.available():
        console.print("llama-cpp-python is not installed (`make bench` installs it)")
        raise SystemExit(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tiny:
            from porter.plugins import architectures
            from porter.testing.models import tiny_checkpoint

            ckpt, ids, limit = tiny_checkpoint(architectures()["llama"], tmp / "tiny"), [i % 96 for i in IDS], "20K"
        else:
            from porter.examples import materialize_smollm2

            ckpt, ids, limit = materialize_smollm2(progress=False), IDS, "40M"
        table = Table(title=f"split GGUF files in stock llama.cpp ({ckpt.name}, --split-max-size {limit}): "
                            "logits of the first shard vs the unsplit file")
        for col in ("type", "shards", "llama.cpp loads", "llama.cpp split = unsplit", "porter split = unsplit",
                    "NMSE llama.cpp vs porter"):
            table.add_column(col)
        failed = False
        cases = {}
        for outtype in ("f32", "q8_0"):
            whole = tmp / f"whole-{outtype}.gguf"
            convert(ckpt, whole, outtype, progress=False)
            report = convert(ckpt, tmp / f"split-{outtype}.gguf", outtype, progress=False,
                             split_max_size=_bytes(limit))
            cases[outtype] = (whole, [s.path for s in report.shards])
        whole = tmp / "whole-Q4_K_M.gguf"
        steps = quantize(cases["f32"][0], whole, "Q4_K_M")
        quantize(cases["f32"][1][0], tmp / "split-Q4_K_M.gguf", "Q4_K_M", split_max_size=_bytes(limit))
        cases["Q4_K_M (quantize)"] = (whole, output_paths(tmp / "split-Q4_K_M.gguf", steps,
                                                          split_max_size=_bytes(limit)))
        for label, (whole, shards) in cases.items():
            with porter.load(whole) as m:
                ours_whole = np.asarray(m.logits(ids))
            with porter.load(shards[0]) as m:
                ours_split = np.asarray(m.logits(ids))
            porter_same = np.array_equal(ours_whole, ours_split)
            try:
                theirs_whole = llamacpp.logits(whole, [ids], 2, tmp / "whole.npy")
                theirs_split = llamacpp.logits(shards[0], [ids], 2, tmp / "split.npy")
                same = np.array_equal(theirs_whole, theirs_split)
                row = ["yes", _same(same, theirs_whole, theirs_split), f"{nmse(theirs_split, ours_split):.2e}"]
            except RuntimeError as exc:
                same, row = False, ["NO", str(exc).strip().splitlines()[-1][:60], "-"]
            failed |= not (same and porter_same and len(shards) >= 3)
            table.add_row(label, str(len(shards)), row[0], row[1], _same(porter_same, ours_whole, ours_split), row[2])
        console.print(table)
    if failed:
        console.print("FAIL: a split file did not load, or its logits differ from the unsplit file's")
        sys.exit(1)
    console.print("pass: llama.cpp and porter load porter's split files, logits identical to the unsplit files")


def _bytes(text: str) -> int:
    from porter.convert.writer import split_size

    return split_size(text)


def _same(same: bool, a, b) -> str:
    import numpy as np

    return "identical" if same else f"DIFFERENT (max |diff| {float(np.max(np.abs(a - b))):.3g})"


if __name__ == "__main__":
    main()
