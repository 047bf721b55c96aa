"""porter's pytest plugin, loaded automatically through the ``pytest11`` entry point.

It gives any test suite (porter's own, or a plugin author's):

- hypothesis profiles ``ci`` (derandomized: the same examples every run, so a failure
  reproduces from its printed example; bounded; no shrinking), ``dev`` (random, shrinking,
  prints ``@reproduce_failure``), ``thorough`` (many examples): choose with
  ``--hypothesis-profile`` or ``HYPOTHESIS_PROFILE``;
- markers ``parity`` and ``realmodel``;
- the ``porter_port`` fixture: ``porter_port("llama", {"num_hidden_layers": 2}, outtype="f32")``
  builds a tiny random checkpoint, converts it and returns a pair (transformers model, porter
  model) for :func:`porter.testing.assert_parity`; every pair is closed at the end of the session.
"""

from __future__ import annotations

import os

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
