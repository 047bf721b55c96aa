"""A GGUF whose spec, hparams or tensors disagree is refused with a ModelError before any ggml call.

Each damaged file is loaded and run in its own process: before these checks several of them
aborted the interpreter inside ggml (exit 134: get_rows past the table, a graph without outputs,
an empty dimension), raised raw Python errors, or grew without bound (n_layer = 2**63-1).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest

import tinygguf

RUN = """
import sys
import porter
from porter.errors import PorterError
try:
    with porter.load(sys.argv[1]) as m:
        print("OK", m.logits([int(t) for t in sys.argv[2].split(",")]).shape)
except PorterError as e:
    print("PorterError:", e)
except ValueError as e:  # bad arguments to forward
    print("ValueError:", e)
"""


def run(path, tokens="1,2,6"):
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    r = subprocess.run([sys.executable, "-c", RUN, str(path), tokens], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout.strip()


def weights(**changes):
    w = tinygguf.tensors()
    w.update(changes)
    return w


def spec(edit):
    s = copy.deepcopy(tinygguf.SPEC)
    edit(s)
    return s


CASES = {
    "fewer embedding rows": (None, weights(**{"token_embd.weight": np.ones((5, 4), np.float32)}),
                             r"token_embd.weight has shape \[5, 4\], the graph spec expects \[8, 4\]"),
    "empty dimension": (None, weights(**{"token_embd.weight": np.ones((0, 4), np.float32)}),
                        r"token_embd.weight has an empty dimension"),
    "wrong inner size": (None, weights(**{"output.weight": np.ones((8, 2), np.float32)}),
                         r"output.weight has shape \[8, 2\], the graph spec expects \[8, 4\]"),
    "integer weight": (None, weights(**{"output.weight": np.ones((8, 4), np.int32)}),
                       r"output.weight has type I32"),
    "no outputs": (spec(lambda s: s.update(outputs=[])), None, r"the graph has no outputs"),
    "n_vocab abc": (tinygguf.spec_with(n_vocab="abc"), None, r"hparam n_vocab = 'abc' is not a positive integer"),
    "norm_eps abc": (tinygguf.spec_with(norm_eps="abc"), None, r"hparam norm_eps = 'abc' is not a finite number"),
    "n_layer -1": (tinygguf.spec_with(n_layer=-1), None, r"hparam n_layer = -1 is not a non-negative integer"),
    "n_layer 2**63-1": (tinygguf.spec_with(n_layer=2**63 - 1), None,
                        r"hparam n_layer = 9223372036854775807 is not a layer count this file can hold \(0\.\.4"),
    "n_layer true": (tinygguf.spec_with(n_layer=True), None, r"hparam n_layer = True is not a non-negative integer"),
}


@pytest.mark.parametrize("case", CASES)
def test_inconsistent_gguf_is_refused(case, tmp_path):
    s, w, message = CASES[case]
    out = run(tinygguf.write(tmp_path / "m.gguf", spec=s, weights=w))
    assert out.startswith("PorterError:"), out
    assert __import__("re").search(message, out), out


def test_consistent_tiny_gguf_runs(tmp_path):
    assert run(tinygguf.write(tmp_path / "m.gguf")) == "OK (3, 8)"


def test_token_ids_are_checked_against_the_table_rows(tmp_path):
    """A table smaller than n_vocab (legitimate when the spec says so) bounds the token ids."""
    s = spec(lambda s: (s["hparams"].update(n_rows=5),
                        s["weights"][0].update(shape=["$n_rows", "$n_embd"])))
    path = tinygguf.write(tmp_path / "m.gguf", spec=s, weights=weights(**{"token_embd.weight": np.ones((5, 4), np.float32)}))
    assert run(path, "1,4") == "OK (2, 8)"
    out = run(path, "1,6")  # aborted in get_rows when ids were checked against n_vocab (8)
    assert out == "ValueError: token ids must be in [0, 5); got 1..6", out


def _raw(path):
    return bytearray(path.read_bytes())


def test_non_utf8_metadata_string(tmp_path):
    path = tinygguf.write(tmp_path / "m.gguf")
    data = _raw(path)
    at = data.index(b'"architecture"')
    data[at + 1] = 0xFF  # inside the spec's text
    path.write_bytes(bytes(data))
    out = run(path)
    assert out.startswith("PorterError:") and "porter.graph_spec is not UTF-8" in out, out


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_gguf_says_truncated(keep, tmp_path):
    path = tinygguf.write(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    out = run(path)
    assert out.startswith("PorterError:") and "truncated" in out, out
