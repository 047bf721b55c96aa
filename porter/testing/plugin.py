"""pytest plugin (loaded through the ``pytest11`` entry point): parity markers and fixtures."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: a parity test against transformers (slow-ish)")
    config.addinivalue_line("markers", "realmodel: uses a real model shipped in a PyPI package")
