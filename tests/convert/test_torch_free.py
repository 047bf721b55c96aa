"""`porter convert` hides torch (reading a config through transformers would import it) and skips
the meta-model module tree; the file it writes must be byte for byte the one the full path writes."""

from __future__ import annotations

import json
import subprocess
import sys

from porter.pipeline import convert, needs_torch_to_convert
from porter.plugins import architectures, builtin_architectures
from porter.testing.models import tiny_checkpoint

CLI_LOOP = """
import json, sys
from porter.cli import main
for src, out in json.loads(sys.argv[1]):
    main(["convert", src, "-o", out, "-t", "q8_0", "--quiet"], standalone_mode=False)
print(json.dumps({"torch_imported": sys.modules.get("torch") is not None}))
"""


def test_cli_convert_without_torch_writes_the_same_bytes_for_every_plugin(tmp_path):
    jobs = []
    for model_type, cls in builtin_architectures().items():
        ckpt = tiny_checkpoint(cls, tmp_path / model_type)
        assert not needs_torch_to_convert(ckpt)
        convert(ckpt, tmp_path / f"{model_type}.full.gguf", "q8_0", progress=False)
        jobs.append((str(ckpt), str(tmp_path / f"{model_type}.cli.gguf")))
    proc = subprocess.run([sys.executable, "-c", CLI_LOOP, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch_imported": False}
    assert "PyTorch was not found" not in proc.stderr
    for src, cli_out in jobs:
        full_out = cli_out.replace(".cli.gguf", ".full.gguf")
        with open(full_out, "rb") as a, open(cli_out, "rb") as b:
            assert a.read() == b.read(), f"{src}: torch-free conversion differs from the full one"


def test_torch_is_needed_for_remote_code_pickles_and_unknown_types(tmp_path):
    ckpt = tiny_checkpoint(architectures()["llama"], tmp_path / "llama")
    assert needs_torch_to_convert(ckpt, trust_remote_code=True)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "not_a_ported_type"}))
    assert needs_torch_to_convert(ckpt)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert needs_torch_to_convert(pickled)
