"""`porter convert` as convert_hf_to_gguf.py users expect it: a model id or a folder, `-o`
optional (GGUF's naming convention), `--outtype auto`, types in any case, `--dry-run`,
`--vocab-only`, fallbacks in one line, and general.name / basename / size_label from the
checkpoint (every llama file used to say "llama")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file

from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint
from tests.convert.conftest import save_safetensors

NAME = "Toymodel-Instruct"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny llama in a folder named like a hub model, with SmolLM2's tokenizer files."""
    folder = tmp_path_factory.mktemp("models") / NAME
    return tiny_checkpoint(architectures()["llama"], folder, tie_word_embeddings=False)


def porter(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "porter", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def n_params(reader) -> int:
    return sum(int(np.prod(t.shape)) for t in reader.tensors)


def test_default_name_and_general_metadata(ckpt, tmp_path):
    r = porter("convert", ckpt, "-t", "Q8_0", "--quiet", cwd=tmp_path)  # the type in upper case
    assert r.returncode == 0, r.stderr
    files = [p.name for p in tmp_path.iterdir()]
    reader = gguf.GGUFReader(tmp_path / files[0])
    size = gguf.size_label(n_params(reader), n_params(reader), 0, 0)
    assert files == [f"Toymodel-{size}-Instruct-Q8_0.gguf"], files
    assert field(reader, "general.basename") == "Toymodel"
    assert field(reader, "general.finetune") == "Instruct"
    assert field(reader, "general.size_label") == size
    assert "Toymodel" in field(reader, "general.name")
    assert f"wrote {tmp_path / files[0]}" in r.stdout


def test_output_folder_gets_the_default_name(ckpt, tmp_path):
    r = porter("convert", ckpt, "-o", "out/", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (made,) = (tmp_path / "out").iterdir()
    assert made.name.startswith("Toymodel-") and made.name.endswith("-Instruct-F32.gguf")


@pytest.mark.parametrize("dtype, code, want", [(np.float16, "F16", QT.F16), (np.float32, "F32", QT.BF16)])
def test_outtype_auto_keeps_the_checkpoints_16_bit_type(ckpt, tmp_path, dtype, code, want):
    """convert_hf_to_gguf.py's rule: f16 when the first tensor is F16, else bf16."""
    folder = tmp_path / NAME
    shutil.copytree(ckpt, folder)
    tensors = {k: v.astype(dtype) for k, v in load_file(folder / "model.safetensors").items()}
    save_safetensors(folder / "model.safetensors", tensors)
    r = porter("convert", folder, "-o", tmp_path / "m.gguf", "-t", "auto", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    matrices = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    assert matrices <= {want, QT.Q8_0, QT.Q6_K} and want in matrices, matrices


def test_dry_run_lists_every_tensor_and_writes_nothing(ckpt, tmp_path):
    r = porter("convert", ckpt, "-t", "q4_k", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    lines = r.stdout.splitlines()
    assert any(line.split()[:1] == ["blk.1.ffn_down.weight"] for line in lines), r.stdout
    assert "dry run: would write" in r.stdout and "nothing written" in r.stdout


def test_fallbacks_are_summarised_in_one_line(ckpt, tmp_path):
    """Rows of 64 do not fit Q4_K's 256: every matrix falls back, in one line (--quiet too)."""
    r = porter("convert", ckpt, "-t", "q4_k", "-o", tmp_path / "m.gguf", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fallback = [line for line in r.stdout.splitlines() if line.startswith("fallback:")]
    assert len(fallback) == 1 and fallback[0].startswith("fallback: 15 tensors: 13 Q4_K -> Q5_0 (row length 64"), r.stdout
    assert "2 Q4_K -> F16 (row length 112" in fallback[0], r.stdout


def test_vocab_only_writes_the_tokenizer_without_tensors(smollm2_dir, tmp_path):
    r = porter("convert", smollm2_dir, "--vocab-only", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (made,) = tmp_path.iterdir()
    assert made.name == "SmolLM2-135M-Instruct-vocab.gguf"
    reader = gguf.GGUFReader(made)
    assert len(reader.tensors) == 0
    assert len(field(reader, "tokenizer.ggml.tokens")) == 49152
    assert "porter.graph_spec" not in reader.fields
    assert made.stat().st_size < 10 * 2**20
    r = porter("run", made, "-p", "hi", cwd=tmp_path)
    assert r.returncode == 1 and "holds no tensors (a vocabulary-only file" in r.stderr, r.stderr


def _hub_cache(root: Path, model_id: str, ckpt: Path, commit: str, branch: str = "main") -> None:
    """The layout huggingface_hub's cache keeps (refs/BRANCH holds the commit; the snapshot
    folder holds the files), built by hand: no hub is reachable here."""
    repo = root / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(ckpt, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)


def test_a_model_id_from_the_local_cache(ckpt, tmp_path):
    cache = tmp_path / "hub"
    _hub_cache(cache, "toyorg/Toymodel-Instruct", ckpt, "a" * 40)
    _hub_cache(cache, "toyorg/Toymodel-Instruct", ckpt, "b" * 40, branch="v2")
    env = {"HF_HUB_CACHE": str(cache)}
    out = tmp_path / "out"
    out.mkdir()
    r = porter("convert", "toyorg/Toymodel-Instruct", "--quiet", cwd=out, env=env)
    assert r.returncode == 0, r.stderr
    (made,) = out.iterdir()
    assert made.name.startswith("Toymodel-")  # named after the id, not the snapshot's commit folder
    r = porter("convert", "toyorg/Toymodel-Instruct", "--revision", "v2", "-o", out / "v2.gguf", "--quiet",
               cwd=out, env=env)
    assert r.returncode == 0, r.stderr
    r = porter("inspect", "toyorg/Toymodel-Instruct", "--revision", "v2", "--no-modules", cwd=out, env=env)
    assert r.returncode == 0 and "llama" in r.stdout, r.stderr
    r = porter("convert", "toyorg/Nothing-Here", "--quiet", cwd=out, env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: toyorg/Nothing-Here: not found in the local cache"), r.stderr
    r = porter("convert", ckpt, "--revision", "v2", cwd=out, env=env)
    assert r.returncode == 1 and "--revision only applies to a model id" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([made.name, "v2.gguf"])
