"""Which devices hold which layers: ``--device`` and ``-ngl`` as llama.cpp users know them.

Devices are ggml's: its registry (``ggml_backend_dev_*``) names them (``CPU``; ``RPC0``,
``RPC1``... for the servers ``--rpc`` connects, in that order; ``CUDA0``, ``Vulkan0``... in a
GPU build), exactly as ``porter devices`` prints them. porter has no device-specific code: an
offload device is any device of type GPU or iGPU that the registry reports (ggml-rpc reports its
servers as GPUs), so a CUDA or Vulkan build needs nothing more.

* ``devices`` (``--device A,B``): the devices the layers go to, in order. Without
  ``n_gpu_layers``, the layers are split across exactly those (the local CPU too if listed).
* ``n_gpu_layers`` (``-ngl N`` or ``all``): the last N layers go to the offload devices (the
  non-CPU ones of ``devices``, by default every GPU/iGPU device, RPC servers included), split
  equally; the first n_layer - N stay on the local CPU, as llama.cpp's ``-ngl`` does. The
  token embeddings and the output head always stay local (llama.cpp's ``-ngl n_layer+1``
  would move the head too).
* Neither (only ``--rpc``): the local CPU and the servers share the layers equally, CPU first.

Splits are contiguous runs, one per device in order, sizes differing by at most one layer
(earlier devices take the remainder); not weighted by device memory.
"""

from __future__ import annotations

from porter.errors import OptionError
from porter.runtime._lib import ffi, lib

ALL = "all"


def parse_devices(text: str | None) -> list[str] | None:
    """``A,B`` -> ["A", "B"] (checked for repeats; names are resolved once servers are connected)."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise OptionError("--device: give device names, e.g. CPU,RPC0 (`porter devices` lists them)")
    seen = [n.lower() for n in names]
    if len(set(seen)) != len(seen):
        raise OptionError(f"--device {text!r} names a device twice")
    return names


def parse_n_gpu_layers(value) -> int | str | None:
    """``-ngl``: a count >= 0 or ``all`` (the model's layer count is checked at load)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in (ALL, "-1"):
        return ALL
    if not text.isdigit():
        raise OptionError(f"-ngl {value}: give a number of layers >= 0, or all")
    return int(text)


def device_name(dev) -> str:
    """The name ggml's registry gives a device (CPU, RPC0, CUDA0, ...)."""
    return ffi.string(lib.ggml_backend_dev_name(dev)).decode()


def _is_cpu(dev) -> bool:
    return int(lib.ggml_backend_dev_type(dev)) == lib.GGML_BACKEND_DEVICE_TYPE_CPU


def _registry() -> list:
    return [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]


def offload_devices() -> list:
    """Every GPU/iGPU device the registry reports (connected RPC servers included), in its order."""
    kinds = (lib.GGML_BACKEND_DEVICE_TYPE_GPU, lib.GGML_BACKEND_DEVICE_TYPE_IGPU)
    return [d for d in _registry() if int(lib.ggml_backend_dev_type(d)) in kinds]


def choose(names: list[str] | None, n_gpu_layers, rpc_devices: list) -> list:
    """The devices that may hold layers, in order; None stands for the local CPU (porter's own
    CPU backend). Call after the RPC servers are connected (their devices are then registered)."""
    if names is not None:
        by_name = {device_name(d).lower(): d for d in _registry()}
        chosen = []
        for name in names:
            dev = by_name.get(name.lower())
            if dev is None:
                known = ", ".join(device_name(d) for d in _registry())
                raise OptionError(f"--device {name}: no such device; this ggml sees {known} (`porter devices` lists "
                                  "them; RPC servers are named RPC0, RPC1, ... in the order --rpc gives them)")
            chosen.append(None if _is_cpu(dev) else dev)
        return chosen
    if n_gpu_layers is None:  # only --rpc: today's equal split, local CPU first
        return [None, *rpc_devices]
    return offload_devices()


def resolve_count(n_gpu_layers, n_layer: int) -> int:
    if n_gpu_layers == ALL:
        return n_layer
    if not 0 <= n_gpu_layers <= n_layer:
        raise OptionError(f"-ngl {n_gpu_layers}: the model has {n_layer} layers; give 0..{n_layer}, or all")
    return n_gpu_layers


def split_layers(n_layer: int, n_devices: int) -> list[int]:
    """The device of each layer: contiguous runs, sizes differing by at most one, earlier devices
    taking the remainder."""
    base, extra = divmod(n_layer, n_devices)
    owners = []
    for device in range(n_devices):
        owners += [device] * (base + (device < extra))
    return owners


def layer_owners(n_layer: int, chosen: list, n_gpu_layers) -> list:
    """The device (None: the local CPU) of each layer."""
    if n_gpu_layers is None:
        if not chosen:
            raise OptionError("--device: no device to hold the layers")
        return [chosen[i] for i in split_layers(n_layer, len(chosen))]
    n = resolve_count(n_gpu_layers, n_layer)
    offload = [d for d in chosen if d is not None]
    if n and not offload:
        known = ", ".join(device_name(d) for d in _registry())
        raise OptionError(f"-ngl {n_gpu_layers}: no device to offload layers to (this ggml sees {known}); connect "
                          "RPC servers with --rpc HOST:PORT, or use a ggml built with a GPU backend")
    return [None] * (n_layer - n) + ([offload[i] for i in split_layers(n, len(offload))] if n else [])
