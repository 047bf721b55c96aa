"""SmolLM2 (q8_0) single-process vs split across 1 and 2 local `porter rpc-server` processes.

The same GGUF file, the same prompt (128 tokens) and greedy decode (64 tokens), measured in one
run one configuration after the other, so the ratios compare like with like on a noisy machine.
The servers run on this machine (loopback TCP): what is measured is the cost of the split itself
(ggml's scheduler, the activations copied at each boundary, one round trip per graph split and
token), not extra compute. Only one device computes at a time (the layers run in order), so every
process gets the same thread count by default (--server-threads changes the servers'). On a
machine other processes keep busy, a server with more than one thread can stall: ggml's own
CPU compute (which rpc-server runs) spins at every op's barrier until its other thread is
scheduled again, and porter's adaptive thread policy only steers the client's local CPU. Usage:

    python bench/rpc.py [--threads 2] [--server-threads N] [--type q8_0] [--reps 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from smollm2 import bench_porter

from porter.testing.rpc import Server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-threads", type=int, default=None, help="threads of each rpc-server (default: --threads)")
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.examples import materialize_smollm2
    from porter.pipeline import convert

    ckpt = materialize_smollm2()
    server_threads = args.server_threads or args.threads
    servers = [Server(server_threads), Server(server_threads)]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"smollm2.{args.type}.gguf"
            convert(ckpt, path, args.type, progress=False)
            configs = [("single process", None), ("CPU + 1 rpc-server", servers[:1]),
                       ("CPU + 2 rpc-servers", servers)]
            for name, used in configs:
                t = time.perf_counter()
                rpc = [s.endpoint for s in used] if used else None
                with porter.load(path, n_threads=args.threads, n_ctx=512, rpc=rpc) as m:
                    load_s = time.perf_counter() - t
                    text = "The history of the printing press begins in the fifteenth century. " * 40
                    ids = m.encode(text)[: args.prompt_tokens]
                    pp, tg = bench_porter(m, ids, args.gen_tokens, args.reps)
                    split = (", ".join(f"{d} {n}" for d, n in m.backend.layers_per_device().items())
                             if used else f"CPU {m.spec.hparams['n_layer']}")
                rows.append((name, split, load_s, pp, tg))
    finally:
        for server in servers:
            server.stop()
    _, _, _, ref_pp, ref_tg = rows[0]
    table = Table(title=f"SmolLM2-135M-Instruct {args.type}, {args.prompt_tokens}-token prompt, {args.gen_tokens} "
                        f"generated, {args.threads} threads (servers {server_threads}), median of {args.reps}; servers on "
                        "loopback")
    for col in ("configuration", "layers", "load s", "prompt tok/s", "x single", "decode tok/s", "x single"):
        table.add_column(col, justify="right")
    for name, split, load_s, pp, tg in rows:
        table.add_row(name, split, f"{load_s:.1f}", f"{pp:.1f}", f"{pp / ref_pp:.2f}", f"{tg:.1f}", f"{tg / ref_tg:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
