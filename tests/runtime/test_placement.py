"""Where layers go: ``--device`` and ``-ngl`` over ggml's device registry (CPU + RPC devices here),
and ``porter serve``/``porter parity`` with ``--rpc``.

Real `porter rpc-server` processes serve on loopback ports, started and stopped by the tests.
Each placement is checked twice: where the weights really are (the buffer type every layer's
tensors were placed in, the layer counts per device) and that the logits and greedy tokens equal
the single-process run of the same file (the same kernels on the same data: bit for bit in
practice, gated at NMSE 1e-12).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from porter.errors import OptionError
from porter.testing.rpc import Server, _env, _free_port

pytestmark = pytest.mark.usefixtures("rpc_build")
PROMPT = [1, 5, 9, 22, 7, 3, 11, 40, 2]
N_LAYER = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """A tiny random llama of 5 layers with SmolLM2's tokenizer (so that the CLI can take text)."""
    from porter.examples import materialize_smollm2
    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    src = materialize_smollm2(request.config.cache.mkdir("porter"), progress=False)
    folder = tmp_path_factory.mktemp("placement")
    ckpt = tiny_checkpoint(architectures()["llama"], folder / "ckpt", seed=3, num_hidden_layers=N_LAYER,
                           vocab_size=49152, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1, tie_word_embeddings=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, ckpt / f)
    out = folder / "tiny.gguf"
    convert(ckpt, out, "f32", progress=False, force=True)
    return out


@pytest.fixture(scope="module")
def local(tiny):
    import porter

    with porter.load(tiny, n_threads=1) as m:
        return m.logits(PROMPT), list(m.generate_ids(PROMPT, 16))


def nmse(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def _names(endpoints) -> list[str]:
    """The registry names of the servers' devices (RPC<n>, numbered in the order this process
    connected them)."""
    from porter.runtime.devices import remote_devices

    return [remote_devices(e)[0].name for e in endpoints]


def _layer_homes(m) -> list[str]:
    """Each layer's home, read from the buffer type its weights were actually placed in: "CPU",
    or the endpoint of the server (ggml-rpc names its buffer types RPC<device>[host:port])."""
    homes = []
    for layer in range(N_LAYER):
        kinds = {re.sub(r"^RPC\d+\[(.*)\]$", r"\1", m.placed.get(name, "CPU"))
                 for name in m.weights if re.match(rf"blk\.{layer}\.", name)}
        assert len(kinds) == 1, (layer, kinds)  # a layer's weights live together
        homes.append(kinds.pop())
    return homes


def _split_run(tiny, local, **where):
    import porter

    with porter.load(tiny, n_threads=1, **where) as m:
        split, homes = m.backend.layers_per_device(), _layer_homes(m)
        logits = m.logits(PROMPT)
        n_splits = m.backend.n_splits
        tokens = list(m.generate_ids(PROMPT, 16))
    assert nmse(logits, local[0]) <= 1e-12, nmse(logits, local[0])
    assert tokens == local[1]
    return split, homes, n_splits


def test_ngl_0_keeps_every_layer_local(tiny, local, servers):
    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    split, homes, n_splits = _split_run(tiny, local, rpc=endpoints, n_gpu_layers=0)
    assert split == {"CPU": N_LAYER, a: 0, b: 0}
    assert homes == ["CPU"] * N_LAYER
    assert n_splits == 1  # the scheduler runs the whole graph locally


def test_ngl_all_puts_every_layer_on_the_servers(tiny, local, servers):
    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    split, homes, n_splits = _split_run(tiny, local, rpc=endpoints, n_gpu_layers="all")
    assert split == {"CPU": 0, a: 3, b: 2}  # equal, the first device taking the remainder
    assert homes == [endpoints[0]] * 3 + [endpoints[1]] * 2
    assert n_splits >= 3  # embeddings/head local, then each server's run of layers


def test_ngl_n_offloads_the_last_layers(tiny, local, servers):
    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    split, homes, _ = _split_run(tiny, local, rpc=endpoints, n_gpu_layers=3)
    assert split == {"CPU": 2, a: 2, b: 1}
    assert homes == ["CPU", "CPU", endpoints[0], endpoints[0], endpoints[1]]


def test_device_list_sets_the_devices_and_their_order(tiny, local, servers):
    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    # without -ngl: split equally across exactly the listed devices, in the order given
    split, homes, _ = _split_run(tiny, local, rpc=endpoints, devices=[b, "cpu"])
    assert split == {"CPU": 2, b: 3}
    assert homes == [endpoints[1]] * 3 + ["CPU"] * 2
    # with -ngl: the listed non-CPU devices take the last layers
    split, homes, _ = _split_run(tiny, local, rpc=endpoints, devices=[b], n_gpu_layers=1)
    assert split == {"CPU": 4, b: 1}
    assert homes == ["CPU"] * 4 + [endpoints[1]]


def test_default_with_rpc_is_the_equal_split_cpu_first(tiny, local, servers):
    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    split, homes, _ = _split_run(tiny, local, rpc=endpoints)
    assert split == {"CPU": 2, a: 2, b: 1}
    assert homes == ["CPU", "CPU", endpoints[0], endpoints[0], endpoints[1]]


def test_out_of_range_ngl_and_unknown_device_name_the_choices(tiny, servers):
    import porter

    endpoints = [s.endpoint for s in servers]
    a, b = _names(endpoints)
    with pytest.raises(OptionError, match=r"-ngl 6: the model has 5 layers; give 0\.\.5, or all"):
        porter.load(tiny, n_threads=1, rpc=endpoints, n_gpu_layers=6)
    with pytest.raises(OptionError, match=rf"--device GPU7: no such device; this ggml sees CPU.*{a}, {b}"):
        porter.load(tiny, n_threads=1, rpc=endpoints, devices=["GPU7"])
    # the servers are still usable after a refused load (nothing half-connected is left)
    with porter.load(tiny, n_threads=1, rpc=endpoints, n_gpu_layers=1) as m:
        assert m.backend.layers_per_device() == {"CPU": 4, a: 1, b: 0}


def _porter(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "porter", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("args, words", [
    (["--device", "GPU7"], "--device GPU7: no such device; this ggml sees CPU"),
    (["-ngl", "2"], "-ngl 2: no device to offload layers to (this ggml sees CPU"),
    (["-ngl", "two"], "-ngl two: give a number of layers >= 0, or all"),
    (["--device", "CPU,cpu"], "names a device twice"),
])
def test_cli_refuses_bad_placement_with_one_line(tiny, args, words):
    proc = _porter("run", str(tiny), "--no-chat", "-p", "hi", "-n", "2", *args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and words in errors[0], proc.stderr


def test_cli_run_ngl_all_generates_the_local_text(tiny):
    """`porter run --rpc A -ngl all` (a fresh server: this process holds the module's ones)."""
    server = Server()
    try:
        split = _porter("run", str(tiny), "--no-chat", "-p", "Once upon a time", "-n", "12", "-t", "1",
                        "--rpc", server.endpoint, "-ngl", "all")
    finally:
        server.stop()
    here = _porter("run", str(tiny), "--no-chat", "-p", "Once upon a time", "-n", "12", "-t", "1")
    assert split.returncode == 0 and here.returncode == 0, (split.stderr, here.stderr)
    assert split.stdout == here.stdout and split.stdout.strip()
    assert re.search(rf"layers: CPU 0, RPC\d+ \({re.escape(server.endpoint)}\) {N_LAYER}", split.stderr), split.stderr


def test_serve_rpc_answers_as_the_local_model_and_exits_1_when_the_server_dies(tiny, tmp_path):
    import porter

    prompt = "The weather today is"
    with porter.load(tiny, n_threads=1) as m:
        want, stats = m.generate(prompt, 10)
    rpc = Server()
    port = _free_port()
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "porter", "serve", str(tiny), "--port", str(port), "-t", "1",
                              "--rpc", rpc.endpoint, "-ngl", "3"], env=_env(), stdout=subprocess.DEVNULL,
                             stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["completion_tokens"] == stats.generated_tokens
        assert re.search(r"layers: CPU 2, RPC\d+ \(.*\) 3", log.read_text()), log.read_text()
        # the RPC server dies: the next request ends porter serve with one error line, status 1
        rpc.stop(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert serve.wait(30) == 1
        assert time.monotonic() - killed < 15
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        rpc.stop()
    text = log.read_text()
    errors = _errors(text)
    assert len(errors) == 1 and "lost the connection to the RPC server" in errors[0] and rpc.endpoint in errors[0], text
    assert "Traceback" not in text


def test_parity_rpc_compares_the_split_run_with_transformers(tmp_path):
    """`porter parity --arch llama --rpc A -ngl all`: the same certificate as the local run (the
    same numbers against transformers), and the report says where the layers ran."""
    server = Server()
    try:
        split = _porter("parity", "--arch", "llama", "-q", "--greedy", "8", "--json", str(tmp_path / "split.json"),
                        "--rpc", server.endpoint, "-ngl", "all", timeout=300)
    finally:
        server.stop()
    here = _porter("parity", "--arch", "llama", "-q", "--greedy", "8", "--json", str(tmp_path / "local.json"),
                   timeout=300)
    assert split.returncode == 0 and here.returncode == 0, (split.stdout + split.stderr, here.stdout + here.stderr)
    assert "PASS" in split.stdout and re.search(r"porter split its layers: CPU 0, RPC\d+ \d+", split.stdout), split.stdout
    s = json.loads((tmp_path / "split.json").read_text())["reports"][0]
    h = json.loads((tmp_path / "local.json").read_text())["reports"][0]
    assert h["placement"] is None and s["placement"]["CPU"] == 0 and sum(s["placement"].values()) > 0
    assert [n["node"] for n in s["nodes"]] == [n["node"] for n in h["nodes"]] and s["nodes"]
    for a, b in zip(s["nodes"], h["nodes"]):  # the same transformers run against the same porter values
        assert a["nmse"] == pytest.approx(b["nmse"], rel=1e-6, abs=1e-18), a["node"]
    assert s["logits"]["nmse"] == pytest.approx(h["logits"]["nmse"], rel=1e-6, abs=1e-18)
    assert s["logits"]["greedy"]["identical"] and h["logits"]["greedy"]["identical"]
