"""Fuzzing the converter: mutations of a tiny llama checkpoint (bytes of ``model.safetensors``,
leaves of its JSON header, leaves of ``config.json``; truncation), each converted by ``porter
convert`` in its own process under a time and memory limit and, when it converts, loaded and run.
The property: exit 0 with a file that loads and runs, or exit 1 with one ``error:`` line; never a
signal, a hang, a raw traceback, a changed input, or a file left behind by a failed convert.
Each case's outcome is a hypothesis event (``--hypothesis-show-statistics`` counts them). The
``ci`` profile runs a small fixed budget; ``--hypothesis-profile=thorough`` runs 62 per property:

    pytest tests/convert/test_fuzz_safetensors.py --hypothesis-profile=thorough --hypothesis-show-statistics
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=max(3, settings().max_examples // 8), deadline=None,
                suppress_health_check=list(HealthCheck))

# Load and run what converted: the output must be a GGUF porter loads (or refuses cleanly).
RUN = """
import sys
import porter
from porter.errors import PorterError
try:
    with porter.load(sys.argv[1]) as m:
        m.logits([1, 2, 3])
    print("OK")
except PorterError as e:
    print("PorterError:", str(e)[:200])
"""


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGML_NO_BACKTRACE="1", PORTER_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=_limits, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def check(ckpt: Path) -> str:
    """Convert ``ckpt`` (damaged by the caller), hold the property, and say what happened."""
    before = _snapshot(ckpt)
    out_dir = ckpt.parent / "out"
    r = _run(["-m", "porter", "convert", str(ckpt), "-o", str(out_dir / "m.gguf"), "--quiet"])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert _snapshot(ckpt) == before, "the checkpoint was changed"
    if r.returncode == 1:
        assert r.stderr.startswith("error: "), r.stderr[-3000:]
        assert not out_dir.exists() or not os.listdir(out_dir), f"left behind: {os.listdir(out_dir)}"
        return "refused by convert (exit 1, one error line)"
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert os.listdir(out_dir) == ["m.gguf"], os.listdir(out_dir)
    run = _run(["-c", RUN, str(out_dir / "m.gguf")])
    assert run.returncode == 0, f"the converted file: exit {run.returncode}\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.startswith(("OK", "PorterError:")), run.stdout
    return "converted and ran" if run.stdout.startswith("OK") else "converted, refused at load"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    return tiny_checkpoint(architectures()["llama"], tmp_path_factory.mktemp("fuzz") / "ckpt", tie_word_embeddings=False)


def _copy(original: Path, tmp: str) -> Path:
    return Path(shutil.copytree(original, Path(tmp) / "ckpt"))


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()  # NaN and infinities as JSON's extensions, as a damaged file may hold
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_the_undamaged_checkpoint_converts_and_runs(original, tmp_path):
    """The property's baseline: without damage, the 'converted, ran' branch is taken."""
    ckpt = _copy(original, str(tmp_path))
    r = _run(["-m", "porter", "convert", str(ckpt), "-o", str(tmp_path / "out" / "m.gguf"), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert _run(["-c", RUN, str(tmp_path / "out" / "m.gguf")]).stdout.startswith("OK")


# Flips fall in the first 2 KiB (the size field and the JSON header) three times in four: a flip
# in the tensor data converts to other weights, which says little.
OFFSET = st.one_of(st.integers(0, 2047), st.integers(0, 2047), st.integers(0, 2047), st.integers(0, 2**20))


@FUZZ
@given(flips=st.lists(st.tuples(OFFSET, st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2**20)))
def test_safetensors_byte_mutations_fail_cleanly(original, flips, cut):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _copy(original, tmp)
        path = ckpt / "model.safetensors"
        data = bytearray(path.read_bytes())
        for at, x in flips:
            data[at % len(data)] ^= x
        path.write_bytes(bytes(data[:cut % len(data)] if cut is not None else data))
        event(check(ckpt))


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=8),
                      st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "U8", "BOOL", "F64"]),
                      st.lists(st.integers(-3, 70000), max_size=3))


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["dtype", "shape", "data_offsets", 0, 1]),
                                  JSON_LEAF), min_size=1, max_size=3))
def test_safetensors_header_mutations_fail_cleanly(original, changes):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _copy(original, tmp)
        path = ckpt / "model.safetensors"
        header, data = _header(path)
        names = sorted(k for k in header if k != "__metadata__")
        for which, field, value in changes:
            entry = header[names[which % len(names)]]
            if isinstance(field, int):  # one element of the shape or of the offsets
                key = "shape" if field == 0 else "data_offsets"
                if entry[key]:
                    entry[key][which % len(entry[key])] = value
            else:
                entry[field] = value
        _write_header(path, header, data)
        event(check(ckpt))


def _config_keys(original: Path) -> list[str]:
    return sorted(json.loads((original / "config.json").read_text()))


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 10**6), st.one_of(JSON_LEAF, st.just("<delete>"))),
                        min_size=1, max_size=3))
def test_config_mutations_fail_cleanly(original, changes):
    keys = _config_keys(original)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _copy(original, tmp)
        config = json.loads((ckpt / "config.json").read_text())
        for which, value in changes:
            key = keys[which % len(keys)]
            if value == "<delete>":
                config.pop(key, None)
            else:
                config[key] = value
        (ckpt / "config.json").write_text(json.dumps(config))
        event(check(ckpt))


@pytest.mark.parametrize("key, value", [("model_type", []), ("model_type", 7), ("model_type", None),
                                        ("model_type", {"a": 1}), ("architectures", 1), ("architectures", [3])])
def test_config_values_of_the_wrong_type_fail_cleanly(original, key, value, tmp_path):
    """Found by the thorough profile: a list as model_type (unhashable) and a number as
    architectures (not iterable) were raw TypeErrors."""
    ckpt = _copy(original, str(tmp_path))
    config = json.loads((ckpt / "config.json").read_text())
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    assert check(ckpt) == "refused by convert (exit 1, one error line)"
