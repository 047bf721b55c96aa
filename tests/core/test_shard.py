"""``--shard K/N`` (porter's pytest plugin): N runs given 1/N ... N/N run every test exactly once."""

from __future__ import annotations

import subprocess
import sys


def _collected(directory, *args) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           *args, str(directory)], capture_output=True, text=True, cwd=directory, timeout=120)
    ids = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    return done.returncode, ids | ({done.stderr.strip()} if done.returncode not in (0, 5) else set())


def test_shards_partition_the_suite(tmp_path):
    (tmp_path / "test_many.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(40))\ndef test_one(i):\n    assert i >= 0\n")
    rc, everything = _collected(tmp_path)
    assert rc == 0 and len(everything) == 40
    parts = [_collected(tmp_path, "--shard", f"{k}/3")[1] for k in (1, 2, 3)]
    assert all(parts), "every part gets some of 40 tests"
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == 40  # disjoint
    assert _collected(tmp_path, "--shard", "2/3")[1] == parts[1]  # the same split every time


def test_a_bad_shard_is_a_usage_error(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    for bad in ("3/2", "0/2", "two", "1/0"):
        rc, out = _collected(tmp_path, "--shard", bad)
        assert rc == 4 and any("--shard" in o for o in out), (bad, out)
