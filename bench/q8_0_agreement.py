"""How often the q8_0 ports pick transformers' next token on SmolLM2, and where the misses come from.

Teacher-forced on transformers' own greedy continuation (32 positions per prompt, 12 prompts),
each runtime's argmax is compared with transformers float32:

* transformers float32 with the weights the q8_0 GGUF stores (the format's own loss),
* porter on that GGUF,
* stock llama.cpp on the same file (when installed),

with logits NMSE and the margin of each flipped position. Usage:

    python bench/q8_0_agreement.py [--threads 2] [--outtype q8_0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import llamacpp

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is photosynthesis?<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\n\ndef mean(xs):\n",
    "The three laws of thermodynamics are",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
    "<|im_start|>user\nHow do I sort a list in Python?<|im_end|>\n<|im_start|>assistant\n",
    "The history of the Roman Empire",
    "Machine learning is a field of",
]
N_POS = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outtype", default="q8_0")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.examples import materialize_smollm2
    from porter.parity.logits import hf_greedy, hf_logits, load_reference
    from porter.parity.metrics import nmse
    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture, convert

    ckpt = materialize_smollm2()
    hf, tok = load_reference(ckpt)
    seqs, windows = [], []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        seqs.append(ids + hf_greedy(hf, ids, N_POS))
        windows.append(slice(len(ids) - 1, len(ids) - 1 + N_POS))

    def pick(per_seq_logits):
        return np.concatenate([lg[w] for lg, w in zip(per_seq_logits, windows)])

    ref = pick([hf_logits(hf, s) for s in seqs])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"smollm2.{args.outtype}.gguf"
        convert(ckpt, gguf, args.outtype, progress=False)
        checkpoint_with_gguf_weights(ckpt, architecture(ckpt).conversion_plan(), gguf, Path(tmp) / "same")
        same, _ = load_reference(Path(tmp) / "same")
        results["transformers f32, the GGUF's weights"] = pick([hf_logits(same, s) for s in seqs])
        del same
        with porter.load(gguf, n_threads=args.threads, n_ctx=256) as m:
            results[f"porter {args.outtype}"] = pick([m.logits(s) for s in seqs])
        if llamacpp.available():
            flat = llamacpp.logits(gguf, seqs, args.threads, Path(tmp) / "llama.npy")
            per_seq = np.split(flat, np.cumsum([len(s) for s in seqs])[:-1])
            results[f"llama.cpp {args.outtype} (same file)"] = pick(per_seq)

    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    table = Table(title=f"SmolLM2-135M-Instruct: top-1 agreement with transformers float32, "
                        f"{len(PROMPTS)} prompts x {N_POS} positions")
    for col in ("runtime", "top-1", "flips", "NMSE", "flipped margins (logits)"):
        table.add_column(col, justify="right")
    for name, got in results.items():
        flips = ref.argmax(-1) != got.argmax(-1)
        table.add_row(name, f"{1 - flips.mean():.1%}", str(int(flips.sum())), f"{nmse(ref, got):.2e}",
                      " ".join(f"{x:.2f}" for x in sorted(margin[flips])))
    Console().print(table)
    if not llamacpp.available():
        Console().print("llama.cpp not measured: llama-cpp-python is not installed (`make bench` installs it)")


if __name__ == "__main__":
    main()
