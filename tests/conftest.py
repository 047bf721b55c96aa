"""Shared test configuration.

Hypothesis profiles (seed policy): ``ci`` is derandomized, so every CI run explores the same
examples and a failure reproduces exactly from the printed example; ``dev`` is random
(failures print the ``@reproduce_failure`` blob and seed); ``thorough`` runs many examples.
Choose with ``--hypothesis-profile`` (``make test`` uses ``ci``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    # no shrinking in CI: a failing example is reported as found (with its blob) within budget
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=10, deadline=None, print_blob=True)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    phases=list(Phase),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
