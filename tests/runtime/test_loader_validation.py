"""A GGUF whose spec, hparams or tensors disagree is refused with a ModelError before any ggml call.

Each damaged file is loaded and run in its own process: before these checks several of them
aborted the interpreter inside ggml (exit 134: get_rows past the table, a graph without outputs,
an empty dimension), raised raw Python errors, or grew without bound (n_layer = 2**63-1).
"""

from __future__ import annotations

import copy
import json
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
    # a transposed matrix was accepted until every plugin's spec stated the GGUF's own shapes
    "transposed matrix": (None, weights(**{"output.weight": np.ones((4, 8), np.float32)}),
                          r"output.weight has shape \[4, 8\], the graph spec expects \[8, 4\]"),
    "integer weight": (None, weights(**{"output.weight": np.ones((8, 4), np.int32)}),
                       r"output.weight has type I32"),
    "no outputs": (spec(lambda s: s.update(outputs=[])), None, r"the graph has no outputs"),
    "n_vocab abc": (tinygguf.spec_with(n_vocab="abc"), None, r"hparam n_vocab = 'abc' is not a positive integer"),
    "norm_eps abc": (tinygguf.spec_with(norm_eps="abc"), None, r"hparam norm_eps = 'abc' is not a finite number"),
    "n_layer -1": (tinygguf.spec_with(n_layer=-1), None, r"hparam n_layer = -1 is not a non-negative integer"),
    "n_layer 2**63-1": (tinygguf.spec_with(n_layer=2**63 - 1), None,
                        r"hparam n_layer = 9223372036854775807 is not a layer count this file can hold \(0\.\.4"),
    "n_layer true": (tinygguf.spec_with(n_layer=True), None, r"hparam n_layer = True is not a non-negative integer"),
    # a width beyond int64 reached cffi (OverflowError); below it, sizes whose products overflow ggml's
    "n_embd_kv 2**70": (tinygguf.spec_with(n_embd_kv=2**70), None,
                        r"hparam n_embd_kv = 1180591620717411303424 is not a non-negative integer below 2\*\*31"),
    "norm_eps a list": (tinygguf.spec_with(norm_eps=[1e-5, 1e-5]), None,
                        r"node norm-0: eps = \[1e-05, 1e-05\] \(\$norm_eps\) is not a finite number >= 0"),
    "eps attribute nan": (spec(lambda s: s["graph"][1]["body"][0]["attrs"].update(eps=float("nan"))), None,
                          r"node norm-0: eps = nan is not a finite number >= 0"),  # ggml asserted (exit 134)
    "eps attribute abc": (spec(lambda s: s["graph"][1]["body"][0]["attrs"].update(eps="abc")), None,
                          r"node norm-0: eps = 'abc' is not a finite number >= 0"),
    "no KV cache width": (tinygguf.spec_with(n_embd_kv=0), None, r"the KV cache holds nothing"),
    "KV cache beyond memory": (tinygguf.spec_with(n_embd_kv=2**30), None,
                               r"the KV cache of 16 positions needs 256\.0 GiB, [0-9.]+ GiB are available"),
}


@pytest.mark.parametrize("case", CASES)
def test_inconsistent_gguf_is_refused(case, tmp_path):
    s, w, message = CASES[case]
    # json.dumps writes NaN as JavaScript's NaN, as a damaged file may hold it
    out = run(tinygguf.write(tmp_path / "m.gguf", spec_text=json.dumps(s or tinygguf.SPEC), weights=w))
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


def test_n_vocab_must_be_positive(tmp_path):
    """Also when no weight shape names it (specs written by porter state literal shapes)."""
    s = tinygguf.spec_with(n_vocab=-3)
    for w in s["weights"]:
        w["shape"] = [8, 4] if w["name"] != "blk.{L}.attn_norm.weight" else [4]
    out = run(tinygguf.write(tmp_path / "m.gguf", spec=s))
    assert "hparam n_vocab = -3 is not a positive integer" in out, out


def _header_string_at(data: bytes, text: str, before: int) -> int:
    """Where the header's copy of ``text`` starts (the last one before byte ``before``: the
    spec's JSON names the same keys and tensors earlier)."""
    return data.rindex(text.encode(), 0, before)


def test_non_utf8_metadata_key(tmp_path):
    path = tinygguf.write(tmp_path / "m.gguf")
    data = _raw(path)
    data[_header_string_at(data, "tiny.context_length", len(data))] = 0xFF
    path.write_bytes(bytes(data))
    out = run(path)
    assert out.startswith("PorterError:"), out
    assert "metadata key 3 of 3 (after porter.graph_spec) is not UTF-8 text; the file is damaged" in out, out


def test_non_utf8_tensor_name(tmp_path):
    path = tinygguf.write(tmp_path / "m.gguf")
    data = _raw(path)
    data[_header_string_at(data, "output.weight", len(data)) + 2] = 0xC3  # a lead byte without its continuation
    path.write_bytes(bytes(data))
    out = run(path)
    assert out.startswith("PorterError:"), out
    assert "the name of tensor 4 of 4 (after blk.1.attn_norm.weight) is not UTF-8 text" in out, out


def _cut_points(data: bytes) -> dict[str, tuple[int, str]]:
    """Where to cut the tiny file, and what the message must say the cut is inside."""
    tensor_table = _header_string_at(data, "output.weight", len(data))
    return {
        "empty": (0, "the file is empty"),
        "inside the fixed header": (10, "inside the first 24 bytes"),
        "inside a key": (_header_string_at(data, "tiny.context_length", tensor_table) + 3,
                         "inside metadata key 3 of 3 (after porter.graph_spec)"),
        "inside a value": (_header_string_at(data, '"outputs"', tensor_table), "inside the value of porter.graph_spec"),
        "inside the tensor table": (tensor_table + 3, "inside the name of tensor 4 of 4 (after blk.1.attn_norm.weight)"),
        "inside the data": (len(data) - 8, "tensor output.weight runs past the end of the file"),
    }


@pytest.mark.parametrize("where", list(_cut_points(tinygguf.write(__import__("pathlib").Path(
    __import__("tempfile").mkdtemp()) / "m.gguf").read_bytes())))
def test_cut_short_says_truncated_and_where(where, tmp_path):
    path = tinygguf.write(tmp_path / "m.gguf")
    data = path.read_bytes()
    cut, inside = _cut_points(data)[where]
    path.write_bytes(data[:cut])
    out = run(path)
    assert out.startswith("PorterError:") and "truncated" in out and inside in out, out
    assert "convert the model again" in out, out
    for jargon in ("unpack", "buffer", "mmap", "codec"):  # struct, numpy and mmap wording
        assert jargon not in out, out


# damaged files through the command line, as a user meets them
def _damaged(tmp_path, how: str):
    path = tmp_path / "m.gguf"
    if how == "corrupt tokenizer JSON":
        return tinygguf.write(path, strings={"porter.tokenizer_json": '{"version": "1.0", "model": {'})
    if how == "n_vocab abc":
        return tinygguf.write(path, spec=tinygguf.spec_with(n_vocab="abc"))
    tinygguf.write(path)
    data = _raw(path)
    if how == "non-UTF-8 key":
        data[_header_string_at(data, "tiny.context_length", len(data))] = 0xFF
    elif how == "non-UTF-8 spec":
        data[data.index(b'"architecture"') + 1] = 0xFF
    elif how == "truncated":
        data = data[:_header_string_at(data, "output.weight", len(data))]
    path.write_bytes(bytes(data))
    return path


CLI_CASES = {
    "corrupt tokenizer JSON": "the tokenizer JSON in this GGUF (porter.tokenizer_json) is corrupt (EOF while parsing",
    "n_vocab abc": "spec hparam n_vocab = 'abc' is not a positive integer",
    "non-UTF-8 key": "metadata key 3 of 3 (after porter.graph_spec) is not UTF-8 text",
    "non-UTF-8 spec": "the value of porter.graph_spec is not UTF-8 text",
    "truncated": "truncated: the file ends",
}


@pytest.mark.parametrize("how", CLI_CASES)
def test_damaged_gguf_through_porter_run(how, tmp_path):
    path = _damaged(tmp_path, how)
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-m", "porter", "run", str(path), "-p", "hi", "--no-chat", "-n", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, GGML_NO_BACKTRACE="1"))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and CLI_CASES[how] in r.stderr, r.stderr
    assert "convert the model again" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"] and path.read_bytes() == before
