"""The plugin-author example (examples/plugin_author, package porter-highway) is a real outside
package: installed (into a temporary folder, so porter's own environment stays porter's), its
own parity suite runs in its own pytest session, and porter's checks pass with it installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugin_author"
PORTER = Path(sys.executable).parent / "porter"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Environment variables of a session in which porter-highway is installed (pip --target)."""
    tmp = tmp_path_factory.mktemp("highway")
    source = tmp / "source"  # built from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("PORTER_PLUGINS", None)
    return {"env": env, "cwd": tmp, "site": target}


def run(args, installed, timeout=900):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=installed["env"],
                          cwd=installed["cwd"])


CHECK_PLUGINS = """
from porter.plugins import architectures, builtin_architectures, is_builtin
from porter.support import readme_model_types
archs = architectures()
assert not is_builtin(archs["highway"]) and archs["highway"].__module__ == "porter_highway.plugin"
# what porter's README table, generated/ and property tests cover: its own plugins only
assert "highway" not in builtin_architectures() and readme_model_types() == list(builtin_architectures())
print("ok")
"""


def test_the_example_is_an_installed_plugin_apart_from_porters_own(installed):
    proc = run([sys.executable, "-c", CHECK_PLUGINS], installed)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = run([str(PORTER), "plugins"], dict(installed, env=dict(installed["env"], COLUMNS="200")))
    assert proc.returncode == 0 and "porter_highway.plugin" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_the_example_parity_suite_passes_in_its_own_session(installed):
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=ci",
                "--rootdir", str(EXAMPLE), str(EXAMPLE / "tests")], installed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
    # the installed copy ran, not the source folder (its templates and generated/ came along)
    assert str(installed["site"] / "porter_highway") in run(
        [sys.executable, "-c", "import porter_highway; print(porter_highway.__file__)"], installed).stdout


GENERATE_CHECKS = """
from click.testing import CliRunner
from porter.cli import main
for args in (["generate", "--check"], ["generate", "--check", "--package", "porter_highway"]):
    r = CliRunner().invoke(main, args)
    print(r.exit_code, r.output.replace(chr(10), " | "))
"""


def test_porter_generate_check_passes_with_the_example_installed(installed):
    proc = run([sys.executable, "-c", GENERATE_CHECKS], installed)  # one process for both checks
    own, package = proc.stdout.strip().splitlines()[-2:]
    assert own.startswith("0 ") and "not covered (outside plugin packages): porter_highway" in own, proc.stdout
    assert package.startswith("0 ") and "porter_highway/generated (1 specs)" in package, proc.stdout


TORCH_FREE_CONVERT = """
import sys
from porter.cli import main
main(["convert", sys.argv[1], "-o", sys.argv[2], "--quiet"], standalone_mode=False)
print("torch imported:", sys.modules.get("torch") is not None)
"""


def test_an_outside_model_type_converts_without_torch(installed, tmp_path):
    """Loading the plugin imports neither transformers nor torch, and its config class
    registers without torch: `porter convert` stays torch-free for the outside model type."""
    ckpt, gguf = tmp_path / "ckpt", tmp_path / "highway.gguf"
    make = ("from porter.plugins import architectures; from porter.testing.models import tiny_checkpoint; "
            f"tiny_checkpoint(architectures()['highway'], {str(ckpt)!r})")
    assert run([sys.executable, "-c", make], installed).returncode == 0
    proc = run([sys.executable, "-c", TORCH_FREE_CONVERT, str(ckpt), str(gguf)], installed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("torch imported: False") and gguf.stat().st_size > 0
