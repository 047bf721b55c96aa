"""The parity properties with every layer on another ggml device: a GPU when the ggml build
has one, and the RPC servers named in ``PORTER_PARITY_RPC`` (``host:port,...``, e.g. another
machine's ``porter rpc-server``).

A device is found at collection time; where there is none (a CPU-only build, no variable set)
this module defines no test at all, so nothing about GPUs is skipped and counted. Gates: a GPU
computes in half precision in places (cuBLAS, flash attention), so it is held to the F16 gate
(logits NMSE <= 1e-4, DESIGN.md); an RPC server is held to the gate of the weights, unless
``PORTER_PARITY_GATE`` names another type (an RPC server that fronts a GPU: ``f16``).
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from porter.plugins import builtin_architectures
from porter.testing.parity import assert_cache_consistent, assert_parity, port_tiny
from porter.testing.strategies import configs

pytestmark = pytest.mark.parity
MODEL_TYPES = sorted(builtin_architectures())
PARITY = settings(max_examples=max(1, settings().max_examples // 3), suppress_health_check=list(HealthCheck))


def offload_targets() -> list[tuple[str, dict, str]]:
    """(test id, porter.load's placement keywords, gate type) per device under test."""
    from porter.runtime import placement
    from porter.runtime.devices import has_rpc, parse_endpoints

    targets = []
    for dev in placement.offload_devices():  # before any RPC server joins the registry: GPUs only
        name = placement.device_name(dev)
        targets.append((name, {"devices": [name], "n_gpu_layers": "all"}, "f16"))
    endpoints = parse_endpoints(os.environ["PORTER_PARITY_RPC"]) if os.environ.get("PORTER_PARITY_RPC") else []
    if endpoints and not has_rpc():
        raise pytest.UsageError("PORTER_PARITY_RPC is set but this ggml has no RPC backend (rebuild: make ggml)")
    for i, endpoint in enumerate(endpoints):
        targets.append((f"RPC{i}", {"rpc": endpoints, "devices": [f"RPC{i}"], "n_gpu_layers": "all"},
                        os.environ.get("PORTER_PARITY_GATE", "")))
    return targets


TARGETS = offload_targets()

if TARGETS:
    @pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
    @pytest.mark.parametrize("model_type", MODEL_TYPES)
    @PARITY
    @given(data=st.data())
    def test_f32_parity_on_another_device(model_type, target, data):
        _, where, gate = target
        overrides = data.draw(configs(model_type), label="config")
        n = data.draw(st.integers(1, 64), label="sequence length")
        with tempfile.TemporaryDirectory() as tmp, \
                port_tiny(model_type, overrides, tmp, placement=where, gate=gate or None) as pair:
            held = pair.porter.backend.layers_per_device()
            assert held.pop("CPU") == 0 and sum(held.values()) > 0, f"layers not all on {target[0]}: {held}"
            ids = data.draw(st.lists(st.integers(0, pair.porter.n_vocab - 1), min_size=n, max_size=n), label="ids")
            assert_parity(pair, ids, context=f"{model_type} on {target[0]} {overrides}")

    @pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
    @pytest.mark.parametrize("model_type", MODEL_TYPES)
    @PARITY
    @given(data=st.data())
    def test_kv_cache_on_another_device(model_type, target, data):
        _, where, gate = target
        overrides = data.draw(configs(model_type), label="config")
        n = data.draw(st.integers(2, 40), label="sequence length")
        split = data.draw(st.integers(1, n - 1), label="prefill length")
        with tempfile.TemporaryDirectory() as tmp, \
                port_tiny(model_type, overrides, tmp, placement=where, gate=gate or None) as pair:
            ids = data.draw(st.lists(st.integers(0, pair.porter.n_vocab - 1), min_size=n, max_size=n), label="ids")
            assert_cache_consistent(pair, ids, split, context=f"{model_type} on {target[0]} {overrides}")
