"""porter's own tests use the profiles and fixtures of its pytest plugin (porter.testing.plugin,
loaded through the pytest11 entry point): ``--hypothesis-profile ci`` is derandomized, so a CI
failure reproduces from the example it prints."""

import atexit
import os
import shutil
import tempfile

# A fresh spec cache for every session (porter.runtime.spec_cache): each stock file a test makes
# is rebuilt at least once, and nothing lands in the user's ~/.cache. Child processes inherit it.
if "PORTER_CACHE_DIR" not in os.environ:
    os.environ["PORTER_CACHE_DIR"] = tempfile.mkdtemp(prefix="porter-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PORTER_CACHE_DIR"], True)
