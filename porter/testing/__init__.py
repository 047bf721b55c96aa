"""Parity testing for porter ports, usable from any pytest suite.

    from porter.testing import assert_parity, assert_cache_consistent, configs

The pytest plugin (``porter.testing.plugin``) loads automatically once porter is installed.
"""

from porter.testing.parity import PortedPair, assert_cache_consistent, assert_parity, port_tiny, stepped_logits
from porter.testing.strategies import MIN_VOCAB, configs, shapes

__all__ = ["MIN_VOCAB", "PortedPair", "assert_cache_consistent", "assert_parity", "configs", "port_tiny", "shapes", "stepped_logits"]
