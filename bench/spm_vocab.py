"""Stock llama.cpp and porter tokenizing the same SentencePiece GGUF (tokenizer.ggml.model = "llama").

The file is porter.testing.spm's: a sentencepiece BPE model trained here with Llama's options and
a tiny llama carrying its vocabulary as llama.cpp's converter writes it. llama.cpp tokenizes in a
child process (its ggml and porter's never share one); porter rebuilds the tokenizer from the
file's tokens and scores (porter.runtime.ggml_vocab). Counted: texts whose ids are identical,
for the file as written and for the tokenizer flags llama.cpp reads (add_space_prefix,
add_bos_token / add_eos_token). Skipped, saying so, when llama-cpp-python is not installed.
Usage:

    python bench/spm_vocab.py [--texts 400]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import llamacpp

_CHILD = """
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps([m.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in json.load(sys.stdin)]))
"""
WORDS = ["the", "The", "class", " ", "  ", "\n", "\n\n", "\t", "é", "日本語", "中文", "🙂", "ñandú", "12345",
         "def", "x", ".", ",", "(", ")", "über", "ß", "\u0301", "\x00", "\r\n", "  \n "]


def random_texts(n: int, seed: int, specials: tuple[str, ...]) -> list[str]:
    rng = random.Random(seed)
    pool = WORDS + ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(3)) for _ in range(40)]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 10))) for _ in range(n)]
    # porter's encode reads special tokens written in the text, llama.cpp's (special=False) does not
    return [t for t in texts if not any(s in t for s in specials)] + [""]


def llama_cpp_ids(gguf: Path, texts: list[str]) -> list[list[int]]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(gguf)], input=json.dumps(texts),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {gguf.name}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=400)
    args = ap.parse_args()
    if not llamacpp.available():
        print("llama.cpp is not installed (`make bench` installs it): nothing to compare")
        return
    import porter
    from porter.testing.spm import SPECIAL_TEXTS, stock_spm_files, write_stock_gguf

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        stock, sp_model = stock_spm_files(directory)
        variants = [("as written (add_bos, no add_eos)", stock)]
        for flags in ({"add_space_prefix": False}, {"add_bos_token": False, "add_eos_token": True}):
            name = ", ".join(f"{k}={v}" for k, v in flags.items())
            variants.append((name, write_stock_gguf(directory / "porter.gguf", sp_model,
                                                     directory / f"{len(variants)}.gguf", **flags)))
        print(f"{'file':<40} {'texts':>6} {'identical ids':>14}")
        for seed, (name, path) in enumerate(variants):
            texts = random_texts(args.texts, seed, SPECIAL_TEXTS)
            with porter.load(path, n_ctx=64, n_threads=1) as m:
                ours = [m.encode(t) for t in texts]
            theirs = llama_cpp_ids(path, texts)
            same = sum(a == b for a, b in zip(ours, theirs))
            print(f"{name:<40} {len(texts):>6} {same:>14}")
            for text, a, b in [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b][:3]:
                print(f"  differs on {text!r}: porter {a}, llama.cpp {b}")
            failed |= same != len(texts)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
