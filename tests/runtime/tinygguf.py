"""A tiny GGUF written without torch or a checkpoint: a hand-written spec (token lookup, a loop of
RMS norms, an output matrix) and its weights, every part replaceable so tests can damage one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import numpy as np

from porter.runtime.loader import SPEC_KEY

SPEC = {
    "format": "porter-graph-spec", "version": 2, "architecture": "tiny",
    "hparams": {"n_vocab": 8, "n_embd": 4, "n_layer": 2, "norm_eps": 1e-5, "n_embd_kv": 4},
    "inputs": [{"name": "tokens", "kind": "tokens"}],
    "weights": [{"name": "token_embd.weight", "shape": ["$n_vocab", "$n_embd"]},
                {"name": "blk.{L}.attn_norm.weight", "shape": ["$n_embd"], "layered": True},
                {"name": "output.weight", "shape": ["$n_vocab", "$n_embd"]}],
    "graph": [{"name": "inp_embd", "op": "get_rows", "inputs": ["token_embd.weight", "tokens"]},
              {"repeat": "n_layer", "init": "inp_embd", "result": "normed-{L}", "body": [
                  {"name": "norm-{L}", "op": "rms_norm", "inputs": ["$carry"], "attrs": {"eps": "$norm_eps"}},
                  {"name": "normed-{L}", "op": "mul", "inputs": ["norm-{L}", "blk.{L}.attn_norm.weight"]}]},
              {"name": "result_output", "op": "mul_mat", "inputs": ["output.weight", "$carry"]}],
    "outputs": ["result_output"],
}


def tensors(n_vocab: int = 8, n_embd: int = 4, n_layer: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"token_embd.weight": rng.standard_normal((n_vocab, n_embd), dtype=np.float32)}
    for i in range(n_layer):
        out[f"blk.{i}.attn_norm.weight"] = rng.standard_normal(n_embd, dtype=np.float32)
    out["output.weight"] = rng.standard_normal((n_vocab, n_embd), dtype=np.float32)
    return out


def write(path: Path, *, spec: dict | None = None, weights: dict[str, np.ndarray] | None = None,
          spec_text: str | None = None, strings: dict[str, str] | None = None) -> Path:
    """Write the tiny GGUF, with ``spec`` (a changed copy of :data:`SPEC`) or raw ``spec_text``
    and ``weights`` in place of the defaults, and any extra string ``strings`` (key: value)."""
    w = gguf.GGUFWriter(str(path), "tiny")
    w.add_string(SPEC_KEY, spec_text if spec_text is not None else json.dumps(spec or SPEC))
    w.add_context_length(16)
    for key, value in (strings or {}).items():
        w.add_string(key, value)
    for name, a in (tensors() if weights is None else weights).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def spec_with(**hparams) -> dict:
    s = copy.deepcopy(SPEC)
    s["hparams"].update(hparams)
    return s
