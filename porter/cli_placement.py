"""The options that say where a model's layers go, shared by run, chat, serve and parity:
``--rpc``, ``--device`` and ``-ngl`` (see :mod:`porter.runtime.placement`)."""

from __future__ import annotations

import click

_RPC_HELP = ("Split the model's layers across this machine and ggml RPC servers (`porter rpc-server`) at "
             "host:port[,host:port...]. The protocol has no authentication or encryption: use servers on "
             "machines and networks you trust.")
_DEVICE_HELP = ("The devices that hold the model's layers, comma-separated, by the names `porter devices [--rpc ...]` "
                "prints (CPU; RPC0, RPC1... for the --rpc servers in order; a GPU build's own, e.g. CUDA0). Without "
                "-ngl the layers are split equally across them, in order.")
_NGL_HELP = ("How many of the model's layers go to the non-CPU devices (the --device ones, by default every GPU and "
             "RPC server), as llama.cpp's -ngl: the last N layers, split equally across them in order; the rest stay "
             "on this machine's CPU. A number 0..n_layer, or all.")


def placement_options(f):
    """--rpc, --device and -ngl/--n-gpu-layers (where the layers go)."""
    f = click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", default=None, metavar="N|all", help=_NGL_HELP)(f)
    f = click.option("--device", "device", default=None, metavar="NAME[,...]", help=_DEVICE_HELP)(f)
    return click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,...]", help=_RPC_HELP)(f)


def placement_kwargs(rpc: str | None, device: str | None, n_gpu_layers: str | None) -> dict:
    """The keyword arguments of porter.load for --rpc/--device/-ngl, checked before anything loads."""
    from porter.runtime.placement import parse_devices, parse_n_gpu_layers

    return {"rpc": rpc_endpoints(rpc), "devices": parse_devices(device),
            "n_gpu_layers": parse_n_gpu_layers(n_gpu_layers)}


def show_split(m) -> None:
    if hasattr(m.backend, "describe"):
        click.secho(f"layers: {m.backend.describe()}", fg="bright_black", err=True)


def rpc_endpoints(rpc: str | None) -> list[str] | None:
    if rpc is None:
        return None
    from porter.runtime.devices import parse_endpoints

    return parse_endpoints(rpc)
