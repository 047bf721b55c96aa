"""porter's pytest plugin, loaded automatically through the ``pytest11`` entry point.

It gives any test suite (porter's own, or a plugin author's):

- hypothesis profiles ``ci`` (derandomized: the same examples every run, so a failure
  reproduces from its printed example; bounded; no shrinking), ``dev`` (random, shrinking,
  prints ``@reproduce_failure``), ``thorough`` (many examples): choose with
  ``--hypothesis-profile`` or ``HYPOTHESIS_PROFILE``;
- markers ``parity`` and ``realmodel``;
- ``--shard K/N``: run only the K-th of N disjoint parts of the collected tests (chosen by a
  stable hash of each test's id, so N machines given 1/N ... N/N run every test once between
  them); it combines with pytest-xdist's ``-n auto`` within a machine;
- the ``porter_port`` fixture: ``porter_port("llama", {"num_hidden_layers": 2}, outtype="f32")``
  builds a tiny random checkpoint, converts it and returns a pair (transformers model, porter
  model) for :func:`porter.testing.assert_parity`; every pair is closed at the end of the session.
"""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard takes K/N (e.g. 2/4: the second of four parts), got {text!r}") from None
    if not 1 <= k <= n:
        raise pytest.UsageError(f"--shard {text}: K must be between 1 and N")
    return k, n


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="K/N", default=None,
                     help="run only the K-th of N disjoint parts of the tests (by a stable hash of each test id), "
                          "to split a suite across N machines")


def pytest_collection_modifyitems(config, items):
    text = config.getoption("--shard", None)
    if text is None:
        return
    k, n = _shard(text)
    keep, drop = [], []
    for item in items:
        (keep if zlib.crc32(item.nodeid.encode()) % n == k - 1 else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: a parity test against transformers")
    config.addinivalue_line("markers", "realmodel: uses a real model shipped in a PyPI package")


@pytest.fixture(scope="session")  # a factory: safe to share across hypothesis examples
def porter_port(tmp_path_factory):
    from porter.testing.parity import port_tiny

    pairs = []

    def make(arch, overrides=None, *, outtype: str = "f32", seed: int = 0):
        pair = port_tiny(arch, overrides, tmp_path_factory.mktemp("porter"), outtype=outtype, seed=seed)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()
