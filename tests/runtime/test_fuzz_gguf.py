"""Fuzzing the loader: mutations of a tiny GGUF written by porter (bytes of the header, the
metadata, the tensor table and the data; leaves of the graph spec; truncation), each loaded and
run in its own process under a time and memory limit. The property: a clean PorterError (or
forward's ValueError for an input) or a correct run; never a signal, a hang, a raw traceback, or
a file left behind. Each case's outcome is a hypothesis event (``--hypothesis-show-statistics``
counts them). The ``ci`` profile runs a small fixed budget; ``--hypothesis-profile=thorough``
runs 250 cases per property:

    pytest tests/runtime/test_fuzz_gguf.py --hypothesis-profile=thorough
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tinygguf

FUZZ = settings(max_examples=max(4, settings().max_examples // 2), deadline=None,
                suppress_health_check=list(HealthCheck))

RUN = """
import sys
import porter
from porter.errors import PorterError
from porter.runtime.verify import nonfinite_tensors
try:
    nonfinite_tensors(sys.argv[1])
    with porter.load(sys.argv[1]) as m:
        m.logits([1, 2, 3])
    print("OK")
except PorterError as e:
    print("PorterError:", str(e)[:200])
except ValueError as e:
    if "token ids" not in str(e):
        raise
    print("ValueError:", e)
"""


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        path.write_bytes(data)
        env = dict(os.environ, GGML_NO_BACKTRACE="1", PORTER_THREADS="1")
        r = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, timeout=60,
                           env=env, preexec_fn=_limits)
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stdout.startswith(("OK", "PorterError:", "ValueError:")), r.stdout
        assert sorted(os.listdir(tmp)) == ["m.gguf"]
        event({"OK": "loaded and ran", "PorterError": "refused (PorterError)",
               "ValueError": "token ids refused (ValueError)"}[r.stdout.split(":")[0].strip()])


def _original() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return tinygguf.write(Path(tmp) / "m.gguf").read_bytes()


ORIGINAL = _original()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(ORIGINAL) - 1), st.integers(1, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, len(ORIGINAL) - 1)))
def test_byte_mutations_fail_cleanly(flips, cut):
    data = bytearray(ORIGINAL)
    for at, x in flips:
        data[at] ^= x
    check(bytes(data[:cut] if cut is not None else data))


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=8),
                      st.lists(st.integers(-3, 10), max_size=3))


def _leaves(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path


LEAVES = list(_leaves(tinygguf.SPEC))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(LEAVES), JSON_LEAF), min_size=1, max_size=3))
def test_spec_leaf_mutations_fail_cleanly(changes):
    spec = copy.deepcopy(tinygguf.SPEC)
    for path, value in changes:
        node = spec
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        text = json.dumps(spec)  # NaN and infinities as JSON's extensions, as a damaged file may hold
        check(tinygguf.write(Path(tmp) / "m.gguf", spec_text=text).read_bytes())
