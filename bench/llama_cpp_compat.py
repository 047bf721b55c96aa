"""Does stock llama.cpp load porter's GGUF files, and compute what transformers computes?

For every causal architecture porter ports: a tiny random checkpoint, `porter convert` (f32),
then logits of the same token ids from transformers, porter and llama.cpp (in a child process:
bench/llamacpp.py), as NMSE against transformers. Some configurations are ones llama.cpp cannot
express (it derives Gemma 2/3's query scale from the head size, has no ALiBi for Falcon);
CONFIGS picks the values real checkpoints use, and NOTES says what remains. Usage:

    python bench/llama_cpp_compat.py [--only llama,gemma2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import llamacpp

IDS = [3, 17, 42, 5, 88, 61, 9, 23, 70, 11, 2, 36]
# Values as real checkpoints have them where the tiny defaults go beyond what llama.cpp reads.
CONFIGS = {
    "gemma2": {"query_pre_attn_scalar": 16},  # = head_dim, as Gemma 2 2B/9B
    "gemma3_text": {"query_pre_attn_scalar": 16},
}
NOTES = {
    "falcon": "rotary layout; ALiBi variants (falcon-rw) run in porter only",
    "gemma2": "query_pre_attn_scalar = head_dim (llama.cpp derives the scale)",
    "gemma3_text": "query_pre_attn_scalar = head_dim; local layers unscaled rope",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import porter
    from porter.parity.logits import hf_logits, load_reference
    from porter.parity.metrics import nmse
    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    console = Console(width=132)
    if not llamacpp.available():
        console.print("llama-cpp-python is not installed (`make bench` installs it)")
        raise SystemExit(1)
    wanted = set(args.only.split(",")) if args.only else None
    table = Table(title="porter's GGUF files in stock llama.cpp: logits NMSE vs transformers (tiny models, f32)")
    for col in ("model type", "GGUF arch", "llama.cpp loads", "llama.cpp NMSE", "porter NMSE", "note"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, cls in architectures().items():
            if not cls.causal or (wanted and model_type not in wanted):
                continue
            ckpt = tiny_checkpoint(cls, Path(tmp) / model_type, **CONFIGS.get(model_type, {}))
            gguf = Path(tmp) / f"{model_type}.gguf"
            convert(ckpt, gguf, "f32", progress=False)
            hf, _ = load_reference(ckpt)
            ref = hf_logits(hf, IDS)
            with porter.load(gguf) as m:
                ours = nmse(ref, m.logits(IDS))
            try:
                theirs = llamacpp.logits(gguf, [IDS], 2, Path(tmp) / f"{model_type}.npy")
                loads, theirs_text = "yes", f"{nmse(ref, theirs):.2e}"
            except RuntimeError as exc:
                loads, theirs_text = "NO", str(exc).strip().splitlines()[-1][:60]
            table.add_row(model_type, cls.gguf_arch, loads, theirs_text, f"{ours:.2e}", NOTES.get(model_type, ""))
        if not wanted or "bert" in wanted:
            table.add_row("bert", "bert", *_minilm(Path(tmp)), "real all-MiniLM-L6-v2: 1 - cosine of the "
                          "mean-pooled embedding; llama.cpp tokenizes from the GGUF")
    console.print(table)


def _minilm(tmp: Path) -> tuple[str, str, str]:
    """(loads, llama.cpp, porter) for the real MiniLM encoder: 1 - cosine similarity with transformers."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    import porter
    from porter.examples import minilm_dir
    from porter.pipeline import convert

    text = "porter takes transformers architectures to ggml"
    ckpt = minilm_dir()
    convert(ckpt, tmp / "minilm.gguf", "f32", progress=False)
    tok, hf = AutoTokenizer.from_pretrained(ckpt), AutoModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        ref = hf(**tok([text], return_tensors="pt")).last_hidden_state[0].mean(0).numpy().astype(np.float64)
    with porter.load(tmp / "minilm.gguf") as m:
        ours = np.asarray(m.embed([text]))[0]

    def gap(v) -> str:
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return f"{1 - ref @ v / (np.linalg.norm(ref) * np.linalg.norm(v)):.1e}"

    try:
        return "yes", gap(llamacpp.embed(tmp / "minilm.gguf", text, 2)), gap(ours)
    except RuntimeError as exc:
        return "NO", str(exc).strip().splitlines()[-1][:60], gap(ours)


if __name__ == "__main__":
    main()
