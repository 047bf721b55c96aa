"""The command line on a tiny model: convert, refuse to overwrite, run, parity, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from porter.cli import main
from porter.plugins import architectures
from porter.testing.models import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(architectures()["qwen2"], tmp_path_factory.mktemp("q2") / "ckpt")


def test_convert_then_refuse_overwrite(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--outtype", "q8_0", "--quiet"])
    assert r.exit_code == 0, r.output
    size = out.stat().st_size
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet"])
    assert r.exit_code == 1
    assert "--force" in r.output
    assert out.stat().st_size == size  # untouched
    r = CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet", "--force", "-t", "f32"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > size


def test_convert_bad_inputs_are_clear(tmp_path):
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "not a folder" in r.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{ not json")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "bad"), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "config.json" in r.output
    assert not (tmp_path / "x.gguf").exists()


def test_truncated_gguf_is_an_error_not_a_crash(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    CliRunner().invoke(main, ["convert", str(ckpt), "-o", str(out), "--quiet"])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "porter.cli", "run", str(cut), "-n", "2", "--no-chat"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "error:" in proc.stderr and "cut.gguf" in proc.stderr


def test_parity_command_passes_and_writes_reports(tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    r = CliRunner().invoke(main, ["parity", "--arch", "llama", "--json", str(js), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "l_out-1" in r.output
    import json

    data = json.loads(js.read_text())
    assert data["reports"][0]["passed"] is True
    assert png.read_bytes()[:4] == b"\x89PNG"
