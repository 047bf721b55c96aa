"""porter's pytest plugin and helpers for parity suites (entry point ``pytest11``)."""
