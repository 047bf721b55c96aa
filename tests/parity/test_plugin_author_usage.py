"""The plugin-author example runs as a separate pytest session, using only porter's public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin_author"


def test_example_suite_passes_in_its_own_session():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=ci",
         "--rootdir", str(EXAMPLE), str(EXAMPLE)],
        capture_output=True, text=True, timeout=900, cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
