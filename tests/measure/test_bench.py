"""porter bench: llama-bench's tests and its three output formats, on a tiny model."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from porter.cli import main

ARGS = ["-p", "8,16", "-n", "4", "-r", "2", "-t", "1"]
TESTS = ["pp8", "pp16", "tg4"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from porter.testing.parity import port_tiny

    # closed at the end of the module (porter_port keeps its pairs to the end of the session,
    # and tests/runtime/test_lifetimes.py counts every live ggml object)
    with port_tiny("llama", directory=tmp_path_factory.mktemp("bench")) as pair:
        yield pair.gguf


def run(*args):
    out = CliRunner().invoke(main, ["bench", *args])
    return out


def test_markdown_table(tiny_gguf):
    out = run(str(tiny_gguf), *ARGS)
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    assert set(lines[1]) <= set("|-: ")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[5] for r in rows] == TESTS and {r[4] for r in rows} == {"1"} and {r[3] for r in rows} == {"CPU"}
    assert all(r[0].startswith("llama ") and r[0].endswith(" F32") for r in rows)
    for r in rows:
        mean, std = r[6].split(" ± ")
        assert float(mean) > 0 and float(std) >= 0


def test_csv_and_json_agree_on_rows(tiny_gguf):
    out = run(str(tiny_gguf), *ARGS, "-o", "csv")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["test"] for r in rows] == TESTS
    assert [(int(r["n_prompt"]), int(r["n_gen"])) for r in rows] == [(8, 0), (16, 0), (0, 4)]
    assert all(float(r["avg_ts"]) > 0 and int(r["avg_ns"]) > 0 and r["model_filename"] == tiny_gguf.name for r in rows)

    out = run(str(tiny_gguf), *ARGS, "-o", "json")
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    assert [r["test"] for r in records] == TESTS
    for r in records:
        assert len(r["samples_ns"]) == 2 and len(r["samples_ts"]) == 2
        n = r["n_prompt"] + r["n_gen"]
        assert r["avg_ts"] == pytest.approx(sum(n * 1e9 / ns for ns in r["samples_ns"]) / 2)
        assert r["model_n_params"] > 0 and r["model_size"] == 4 * r["model_n_params"]  # every tensor f32


def test_prompt_plus_generation_rows(tiny_gguf):
    args = [str(tiny_gguf), "-p", "16", "-n", "8", "-pg", "16,8", "-pg", "0,0", "-pg", "32,4", "-r", "5", "-t", "1"]
    tests = ["pp16", "tg8", "pp16+tg8", "pp32+tg4"]  # llama-bench's order; 0,0 skipped as llama-bench skips it
    out = run(*args)
    assert out.exit_code == 0, out.output
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.strip().splitlines()[2:]]
    assert [r[5] for r in rows] == tests
    assert all(float(r[6].split(" ± ")[0]) > 0 for r in rows)

    out = run(*args, "-o", "csv")
    assert out.exit_code == 0, out.output
    assert [(r["test"], int(r["n_prompt"]), int(r["n_gen"])) for r in csv.DictReader(io.StringIO(out.stdout))] == \
        [("pp16", 16, 0), ("tg8", 0, 8), ("pp16+tg8", 16, 8), ("pp32+tg4", 32, 4)]

    out = run(*args, "-o", "json")
    assert out.exit_code == 0, out.output
    records = {r["test"]: r for r in json.loads(out.stdout)}
    assert list(records) == tests
    pg = records["pp16+tg8"]
    assert len(pg["samples_ns"]) == 5
    assert pg["avg_ts"] == pytest.approx(sum(24 * 1e9 / ns for ns in pg["samples_ns"]) / 5)  # 16 + 8 tokens a run
    # a run is one prompt pass and 8 generation steps: about the two tests' sum (measured 1.0-1.5x
    # of it). On this tiny model the two parts take about as long (~0.1 ms each), so a run of either
    # alone would be 0.4-0.6x the sum; generous bounds, on medians (a busy machine stalls samples)
    median = {t: sorted(r["samples_ns"])[2] for t, r in records.items()}
    both = median["pp16"] + median["tg8"]
    assert 0.7 * both < median["pp16+tg8"] < 3 * both, median


def test_bad_options_are_refused(tiny_gguf):
    for args, message in ((["-p", "8,x"], "whole numbers"), (["-p", "0", "-n", "0"], "nothing to measure"),
                          (["-r", "0"], "at least 1 repetition"), (["-t", "0"], ">= 1"),
                          (["-pg", "8"], "-pg 8: give two whole numbers"),
                          (["-pg", "8,4,2"], "give two whole numbers"), (["-pg", "8,x"], "give two whole numbers"),
                          (["-pg", "-1,4"], "-pg -1,4: both values must be >= 0"),
                          (["-p", "0", "-n", "0", "-pg", "0,0"], "nothing to measure")):
        out = run(str(tiny_gguf), *args)
        assert out.exit_code == 1 and message in out.output, out.output
        assert out.output.startswith("error: ") and len(out.output.strip().splitlines()) == 1, out.output
