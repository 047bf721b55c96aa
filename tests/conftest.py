"""porter's own tests use the profiles and fixtures of its pytest plugin (porter.testing.plugin,
loaded through the pytest11 entry point): ``--hypothesis-profile ci`` is derandomized, so a CI
failure reproduces from the example it prints."""
