"""Nothing is lost whatever happens during a convert: signals, stale temporary files, outputs
that must never be replaced, directory outputs, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from porter.cli import main

SLOW_CONVERT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background parent (nohup, &) ignores SIGINT
import porter.convert.writer as w
real = w._write_tensor
def slow(*a, **k):
    print("WRITING", flush=True)
    time.sleep(0.5)
    return real(*a, **k)
w._write_tensor = slow
from porter.cli import main
main(["convert", sys.argv[1], "-o", sys.argv[2], "--quiet"])
"""


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_convert_leaves_no_file(sig, tiny_llama_dir, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(tiny_llama_dir), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert leftovers(tmp_path) == [], err
    if sig != signal.SIGINT:
        assert proc.returncode == 128 + sig and "stopped by signal" in err and "Traceback" not in err, err


def test_a_stale_temp_file_is_removed_by_the_next_convert(tiny_llama_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".m.gguf.{dead}.0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / f".m.gguf.{os.getpid()}.0123abcd.tmp"  # a live process's: kept
    other.write_bytes(b"y")
    r = cli("convert", tiny_llama_dir, "-o", tmp_path / "m.gguf", "--quiet")
    assert r.exit_code == 0, r.output
    assert leftovers(tmp_path) == [other.name, "m.gguf"]


def test_force_never_replaces_a_device(tiny_llama_dir, tmp_path):
    r = cli("convert", tiny_llama_dir, "-o", "/dev/null", "--quiet", "--force")
    assert r.exit_code == 1 and "/dev/null is not a regular file" in r.output, r.output
    assert not os.path.isfile("/dev/null")


def test_force_never_replaces_an_input(tiny_llama_dir, tmp_path):
    target = tiny_llama_dir / "model.safetensors"
    before = target.read_bytes()
    r = cli("convert", tiny_llama_dir, "-o", target, "--quiet", "--force")
    assert r.exit_code == 1 and "is an input of this conversion" in r.output, r.output
    assert target.read_bytes() == before
    r = cli("convert", tiny_llama_dir, "-o", tiny_llama_dir / "config.json", "--quiet", "--force")
    assert r.exit_code == 1 and "is an input of this conversion" in r.output, r.output


def test_output_ending_in_a_slash_goes_inside_the_directory(tiny_llama_dir, tmp_path):
    r = cli("convert", tiny_llama_dir, "-o", f"{tmp_path}/dir/", "--quiet")
    assert r.exit_code == 0, r.output
    (made,) = leftovers(tmp_path / "dir")  # named as convert_hf_to_gguf.py names files: Tiny-Llama0-135K-F32.gguf
    assert made.startswith("Tiny-Llama0-") and made.endswith("-F32.gguf"), made


def test_directories_made_for_a_failed_output_are_removed(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    r = cli("convert", bad, "-o", tmp_path / "a" / "b" / "m.gguf", "--quiet")
    assert r.exit_code == 1
    assert leftovers(tmp_path) == ["ckpt"]


def test_a_failure_while_writing_removes_the_directories_it_made(tiny_llama_dir, tmp_path, monkeypatch):
    import porter.convert.writer as w

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(w, "_write_tensor", full)
    r = cli("convert", tiny_llama_dir, "-o", tmp_path / "a" / "b" / "m.gguf", "--quiet")
    assert r.exit_code == 1 and "no space left on device" in r.output and "MiB" in r.output, r.output
    assert leftovers(tmp_path) == []
