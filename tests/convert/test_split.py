"""Split GGUF files (`porter convert|quantize --split-max-size/--split-max-tensors`): shards as
llama.cpp's gguf-split and convert_hf_to_gguf.py write them (names, split.* keys, metadata in the
first shard, tensors whole), loaded by porter from the first shard with logits identical to the
unsplit file's, and refused clearly when a shard is missing or from another conversion."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as VT, Keys
from gguf.gguf_writer import SHARD_NAME_FORMAT
from safetensors.numpy import load_file

import porter
from porter.convert.writer import split_size
from porter.errors import ModelError, PorterError
from porter.pipeline import convert
from porter.plugins import architectures
from porter.runtime import gguf_file
from porter.testing.models import tiny_checkpoint
from tests.convert.conftest import save_safetensors

IDS = [3, 17, 42, 5, 88, 61, 9, 23]
LIMIT = 40_000  # bytes of tensor data per shard: the tiny llama's 0.3 MiB in about 8 shards


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(architectures()["llama"], tmp_path_factory.mktemp("models") / "Toy",
                           tie_word_embeddings=False)


@pytest.fixture(scope="module")
def unsplit(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsplit") / "toy.gguf"
    convert(ckpt, out, "f32", progress=False)
    return out


@pytest.fixture(scope="module")
def split(ckpt, tmp_path_factory) -> list[Path]:
    """The shards of the tiny llama at LIMIT bytes each."""
    folder = tmp_path_factory.mktemp("split")
    report = convert(ckpt, folder / "toy.gguf", "f32", progress=False, split_max_size=LIMIT)
    shards = [s.path for s in report.shards]
    assert len(shards) >= 3 and sorted(folder.iterdir()) == shards
    return shards


def porter_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "porter", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def copy_shards(shards: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(s, folder / s.name)) for s in shards]


def logits(path: Path, **load) -> np.ndarray:
    with porter.load(path, **load) as m:
        return np.asarray(m.logits(IDS))


# ----------------------------------------------------------------------------- the convention
def test_runtime_names_the_keys_and_shards_as_gguf_py_does():
    assert (gguf_file.SPLIT_NO, gguf_file.SPLIT_COUNT, gguf_file.SPLIT_TENSORS_COUNT) == (
        Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    assert gguf_file.SHARD_NAME_FORMAT == SHARD_NAME_FORMAT


def test_shards_follow_llama_cpps_convention(split, unsplit):
    n = len(split)
    assert [s.name for s in split] == [SHARD_NAME_FORMAT.format("toy", i, n) for i in range(1, n + 1)]
    whole = GGUFReader(unsplit)
    readers = [GGUFReader(s) for s in split]
    meta = {k for k in whole.fields if not k.startswith("GGUF.")}
    split_keys = {Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT}
    for i, r in enumerate(readers):
        fields = r.fields
        assert fields[Keys.Split.LLM_KV_SPLIT_NO].contents() == i
        assert fields[Keys.Split.LLM_KV_SPLIT_COUNT].contents() == n
        assert fields[Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT].contents() == len(whole.tensors)
        # the types llama.cpp reads them as (gguf_get_val_u16 / i32 abort on others)
        assert [VT(fields[k].types[0]) for k in sorted(split_keys)] == [VT.UINT16, VT.UINT16, VT.INT32]
        keys = {k for k in fields if not k.startswith("GGUF.")}
        # all metadata in the first shard only, as gguf-split writes it
        assert keys == (meta | split_keys if i == 0 else split_keys), i
        assert r.tensors, f"shard {i + 1} holds no tensor"
        data = sum(int(t.n_bytes) for t in r.tensors)
        assert data <= LIMIT or len(r.tensors) == 1, (i, data)  # a tensor is never cut
    for first, second in zip(readers, readers[1:]):  # full shards: the next tensor did not fit
        assert sum(int(t.n_bytes) for t in first.tensors) + int(second.tensors[0].n_bytes) > LIMIT
    together = [t for r in readers for t in r.tensors]
    assert [t.name for t in together] == [t.name for t in whole.tensors]  # same order, none twice
    for a, b in zip(together, whole.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


def test_split_max_tensors(ckpt, unsplit, tmp_path):
    report = convert(ckpt, tmp_path / "toy.gguf", "f32", progress=False, split_max_tensors=8)
    counts = [len(GGUFReader(s.path).tensors) for s in report.shards]
    n = len(GGUFReader(unsplit).tensors)
    assert counts == [8] * (n // 8) + ([n % 8] if n % 8 else [])


def test_sizes_read_as_llama_cpp_reads_them():
    assert [split_size(s) for s in ("500M", "2G", "7k", "123", "1g")] == [500 * 10**6, 2 * 10**9, 7000, 123, 10**9]
    for bad in ("0", "-1M", "1.5G", "10MB", "", "G"):
        with pytest.raises(PorterError, match="--split-max-size"):
            split_size(bad)


# ----------------------------------------------------------------------------- porter loads them
@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_split_logits_equal_the_unsplit_files(ckpt, tmp_path, outtype):
    """Bit for bit, through the mapped buffers (one per shard) and the copies (q4_0: repacked)."""
    whole = tmp_path / "whole.gguf"
    convert(ckpt, whole, outtype, progress=False)
    report = convert(ckpt, tmp_path / "parts.gguf", outtype, progress=False, split_max_size=LIMIT // 4)
    assert len(report.shards) >= 3
    first = report.shards[0].path
    reference = logits(whole)
    assert np.array_equal(logits(first), reference)
    assert np.array_equal(logits(first, use_mmap=False), reference)


def test_inspect_and_verify_read_every_shard(split, unsplit, tmp_path):
    r = porter_cli("inspect", split[0], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{len(GGUFReader(unsplit).tensors)} tensors" in r.stdout and f"{len(split)} shards" in r.stdout, r.stdout
    r = porter_cli("verify", split[0], cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout


def test_missing_shard_is_named(split, tmp_path):
    shards = copy_shards(split, tmp_path / "m")
    shards[2].unlink()
    with pytest.raises(ModelError, match=rf"{shards[2]}: no such file: shard 3 of the {len(shards)}"):
        porter.load(shards[0])
    r = porter_cli("run", shards[0], "-p", "hi", "-n", "1", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and shards[2].name in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_later_shard_is_refused_pointing_to_the_first(split):
    with pytest.raises(ModelError, match=rf"shard 2 of {len(split)} .* give the first one, {split[0]}"):
        porter.load(split[1])


def test_wrong_split_count_is_named(split, tmp_path):
    shards = copy_shards(split, tmp_path / "c")
    r = GGUFReader(shards[1], "r+")
    r.fields[Keys.Split.LLM_KV_SPLIT_COUNT].parts[-1][0] = len(shards) + 1
    del r
    with pytest.raises(ModelError, match=rf"{shards[1]}: split.count is {len(shards) + 1}, but {shards[0].name} "
                                         rf"says {len(shards)}"):
        porter.load(shards[0])


def test_shard_from_another_split_is_named(split, tmp_path):
    shards = copy_shards(split, tmp_path / "o")
    shutil.copy(shards[1], shards[2])  # shard 2's tensors under shard 3's name
    with pytest.raises(ModelError, match=rf"{shards[2]}: split.no is 1, its name says shard 3"):
        porter.load(shards[0])


def test_renamed_first_shard_is_refused(split, tmp_path):
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(split[0], renamed)
    with pytest.raises(ModelError, match=r"first of \d+ shards .* its name does not end in -00001-of-"):
        porter.load(renamed)


def test_tensor_count_mismatch_is_named(split, tmp_path):
    shards = copy_shards(split, tmp_path / "t")
    r = GGUFReader(shards[0], "r+")
    r.fields[Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT].parts[-1][0] += 1
    del r
    with pytest.raises(ModelError, match=r"split.tensors.count is \d+, the \d+ shards hold \d+ tensors"):
        porter.load(shards[0])


# ----------------------------------------------------------------------------- writing them safely
def test_existing_shards_are_refused_without_force(ckpt, split, tmp_path):
    shards = copy_shards(split, tmp_path)
    before = {s: s.read_bytes() for s in shards}
    shards[-1].write_bytes(b"not a shard")
    before[shards[-1]] = b"not a shard"
    r = porter_cli("convert", ckpt, "-o", tmp_path / "toy.gguf", "--split-max-size", LIMIT, "--quiet", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "already exists; pass --force" in r.stderr, r.stderr
    assert {s: s.read_bytes() for s in shards} == before and sorted(tmp_path.iterdir()) == shards
    r = porter_cli("convert", ckpt, "-o", tmp_path / "toy.gguf", "--split-max-size", LIMIT, "--quiet", "--force",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [s.read_bytes() for s in shards] == [s.read_bytes() for s in split]
    assert f"in {len(shards)} shards" in r.stdout


def test_failure_in_a_later_shard_leaves_nothing(ckpt, tmp_path):
    """A NaN in the last tensor: the earlier shards are already written (to temporary files), and
    none may be left."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = load_file(bad / "model.safetensors")
    last = "lm_head.weight"
    weights[last] = weights[last].copy()
    weights[last][0, 0] = np.nan
    save_safetensors(bad / "model.safetensors", weights)
    out = tmp_path / "out"
    r = porter_cli("convert", bad, "-o", out / "toy.gguf", "--split-max-size", LIMIT, "--quiet", cwd=tmp_path)
    assert r.returncode == 1 and "NaN" in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert not out.exists()  # not even the folder made for it


def test_dry_run_shows_the_shard_plan(ckpt, split, tmp_path):
    r = porter_cli("convert", ckpt, "-o", tmp_path / "toy.gguf", "--split-max-size", f"{LIMIT}", "--dry-run",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n = len(split)
    for i, shard in enumerate(split, 1):
        reader = GGUFReader(shard)
        k = len(reader.tensors)
        assert f"shard {i}/{n} {shard.name}: {k} tensor{'s' if k != 1 else ''}, " in r.stdout, r.stdout
    assert f"in {n} shards; nothing written" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_default_name_is_split(ckpt, tmp_path):
    r = porter_cli("convert", ckpt, "-t", "f32", "--split-max-tensors", "10", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    stem = names[0].removesuffix(SHARD_NAME_FORMAT.format("", 1, len(names)))
    assert stem.startswith("Toy-") and stem.endswith("-F32")
    assert names == [SHARD_NAME_FORMAT.format(stem, i, len(names)) for i in range(1, len(names) + 1)]


def test_one_shard_is_a_plain_file(ckpt, unsplit, tmp_path):
    report = convert(ckpt, tmp_path / "toy.gguf", "f32", progress=False, split_max_size=10**9)
    assert [s.path.name for s in report.shards] == ["toy.gguf"]
    assert Keys.Split.LLM_KV_SPLIT_COUNT not in GGUFReader(tmp_path / "toy.gguf").fields
    assert (tmp_path / "toy.gguf").read_bytes() == unsplit.read_bytes()


@pytest.mark.parametrize("value", ["0", "12X", "-5"])
def test_bad_sizes_are_one_error_line(ckpt, tmp_path, value):
    r = porter_cli("convert", ckpt, "-o", tmp_path / "toy.gguf", "--split-max-size", value, cwd=tmp_path)
    assert r.returncode != 0 and "--split-max-size" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- quantize
def test_quantize_reads_and_writes_shards(split, unsplit, tmp_path):
    """A split f32 input, quantized into shards and into one file: the same logits as quantizing the
    unsplit file, and no split.* key of the input carried over."""
    from porter.convert.quantize import quantize

    quantize(unsplit, tmp_path / "ref.gguf", "Q8_0")
    quantize(split[0], tmp_path / "one.gguf", "Q8_0")
    assert not {k for k in GGUFReader(tmp_path / "one.gguf").fields if k.startswith("split.")}
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    r = porter_cli("quantize", split[0], tmp_path / "q.gguf", "q8_0", "--split-max-size", "20K", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shards = sorted(tmp_path.glob("q-*-of-*.gguf"))
    assert len(shards) >= 3 and f"in {len(shards)} shards" in r.stdout
    assert all(GGUFReader(s).fields[Keys.Split.LLM_KV_SPLIT_COUNT].contents() == len(shards) for s in shards)
    assert np.array_equal(logits(shards[0]), logits(tmp_path / "ref.gguf"))
    r = porter_cli("quantize", split[0], tmp_path / "q.gguf", "q8_0", "--split-max-size", "20K", cwd=tmp_path)
    assert r.returncode == 1 and "already exists; pass --force" in r.stderr, r.stderr


SLOW_SPLIT_CONVERT = """
import sys, time
import porter.convert.writer as w
real = w._write_tensor
def slow(*a, **k):
    print("WRITING", a[1], flush=True)  # the shard it writes into
    time.sleep(0.1)
    return real(*a, **k)
w._write_tensor = slow
from porter.cli import main
main(["convert", sys.argv[1], "-o", sys.argv[2], "--split-max-tensors", "3", "--quiet", *sys.argv[3:]])
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over existing shards with --force"])
def test_a_signal_while_writing_a_later_shard_leaves_nothing(ckpt, tmp_path, existing):
    import signal

    out = tmp_path / "toy.gguf"
    before = {}
    if existing:
        before = {s.path: s.path.read_bytes()
                  for s in convert(ckpt, out, "f32", progress=False, split_max_tensors=3).shards}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SPLIT_CONVERT, str(ckpt), str(out),
                             *(["--force"] if existing else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:  # until it writes into the third shard: two are complete (as temporary files)
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)[1]
        if line.split() == ["WRITING", "2"]:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal" in err and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == sorted(before)  # no temporary file, no new shard
    assert {p: p.read_bytes() for p in before} == before  # the old shards untouched


def test_parity_against_a_split_files_weights_reads_every_shard(ckpt, tmp_path):
    """`porter parity shard1.gguf --checkpoint CKPT --against gguf` gives transformers the values
    of every shard (tensors of a missing shard would silently keep the checkpoint's values)."""
    from safetensors.numpy import load_file as load

    from porter.parity.same_weights import checkpoint_with_gguf_weights
    from porter.pipeline import architecture

    plan = architecture(ckpt).conversion_plan()
    convert(ckpt, tmp_path / "whole.gguf", "q8_0", progress=False)
    shards = [s.path for s in convert(ckpt, tmp_path / "parts.gguf", "q8_0", progress=False,
                                      split_max_size=LIMIT // 4).shards]
    assert len(shards) >= 3
    changed_whole = checkpoint_with_gguf_weights(ckpt, plan, tmp_path / "whole.gguf", tmp_path / "w")
    changed_split = checkpoint_with_gguf_weights(ckpt, plan, shards[0], tmp_path / "s")
    assert changed_split == changed_whole and len(changed_whole) > 3
    whole = load(next((tmp_path / "w").glob("*.safetensors")))
    parts = load(next((tmp_path / "s").glob("*.safetensors")))
    assert whole.keys() == parts.keys() and all(np.array_equal(whole[k], parts[k]) for k in whole)


def test_a_split_file_without_porters_spec_is_rebuilt_from_every_shard(split, unsplit, tmp_path):
    """A llama.cpp-style split file (no porter.graph_spec): the plugin rebuilds the spec from the
    first shard's keys and the tensors of all shards."""
    from porter.testing.gguf_edit import strip_keys

    shards = copy_shards(split[1:], tmp_path)
    assert strip_keys(split[0], tmp_path / split[0].name, ["porter.graph_spec"]) == ["porter.graph_spec"]
    with porter.load(tmp_path / split[0].name) as m:
        assert m.metadata["spec_source"].startswith("rebuilt")
        ours = np.asarray(m.logits(IDS))
    assert len(shards) >= 2 and np.array_equal(ours, logits(unsplit))
