"""`porter convert` refuses a checkpoint that does not match its config.json, naming the tensor,
the shape the config implies and the one found, and leaves no file behind. Before, each of these
wrote a GGUF (exit 0) that did not load or computed something else."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from porter.cli import main
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint
from tests.convert.conftest import save_safetensors


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(architectures()["llama"], tmp_path_factory.mktemp("llama") / "ckpt",
                           tie_word_embeddings=False)


def edit(base, tmp_path, config=None, tensors=None):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    if config:
        cfg = json.loads((ckpt / "config.json").read_text())
        config(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    if tensors:
        ts = load_file(ckpt / "model.safetensors")
        tensors(ts)
        save_safetensors(ckpt / "model.safetensors", ts)
    return ckpt


def convert(ckpt, tmp_path):
    out = tmp_path / "out" / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet"])
    return r, out


def _pop(name):
    return lambda ts: ts.pop(name)


def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _del(key):
    return lambda cfg: cfg.pop(key)


CASES = {
    "a tensor missing in layer 1": (None, _pop("model.layers.1.mlp.up_proj.weight"),
                                    "blk.1.ffn_up.weight: the graph needs it, the checkpoint provides nothing"),
    "a whole layer missing": (None, lambda ts: [ts.pop(k) for k in list(ts) if k.startswith("model.layers.1.")],
                              "blk.1.attn_q.weight: the graph needs it"),
    "more layers in the config": (_set(num_hidden_layers=3), None, "blk.2.attn_q.weight: the graph needs it"),
    "vocab_size larger than the embedding": (_set(vocab_size=200), None, "expected shape [200, "),
    "a wrong head_dim": (lambda cfg: cfg.update(head_dim=cfg["head_dim"] * 2), None, "blk.0.attn_q.weight"),
    "lm_head missing, embeddings not tied": (None, _pop("lm_head.weight"),
                                             "tie_word_embeddings false, but the checkpoint has no lm_head.weight"),
    "a same-size shape in the header": (None, lambda ts: ts.update({
        "model.layers.1.mlp.down_proj.weight": ts["model.layers.1.mlp.down_proj.weight"].reshape(
            ts["model.layers.1.mlp.down_proj.weight"].shape[::-1]).copy()}) if False else ts.update({
        "model.layers.1.self_attn.k_proj.weight": ts["model.layers.1.self_attn.k_proj.weight"].reshape(
            -1, ts["model.layers.1.self_attn.k_proj.weight"].shape[1] * 2).copy()}), "blk.1.attn_k.weight"),
}


@pytest.mark.parametrize("case", CASES)
def test_inconsistent_checkpoint_is_refused(case, base, tmp_path):
    config, tensors, names = CASES[case]
    r, out = convert(edit(base, tmp_path, config, tensors), tmp_path)
    assert r.exit_code == 1, (r.output, r.exception)
    assert "error: " in r.output and names in r.output, r.output
    assert not out.exists() and not out.parent.exists() or not any(out.parent.iterdir())


def test_hidden_size_absent(base, tmp_path):
    r, out = convert(edit(base, tmp_path, _del("hidden_size")), tmp_path)
    assert r.exit_code == 1 and "error: " in r.output and "hidden_size" in r.output, r.output
    assert not out.exists()


def test_integer_dtype_in_the_header_is_refused(base, tmp_path):
    ckpt = edit(base, tmp_path)
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.layers.0.mlp.up_proj.weight"]["dtype"] = "I32"  # same size as F32
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    (ckpt / "model.safetensors").write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n:]))
    r, out = convert(ckpt, tmp_path)
    assert r.exit_code == 1 and "model.layers.0.mlp.up_proj.weight (I32)" in r.output, r.output
    assert not out.exists()


def test_the_consistent_checkpoint_converts(base, tmp_path):
    r, out = convert(edit(base, tmp_path), tmp_path)
    assert r.exit_code == 0, r.output
    assert out.is_file()
