"""``porter serve MODEL``: the OpenAI-compatible server (uvicorn) on one GGUF."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from porter.cli_placement import placement_options
from porter.errors import OptionError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OptionError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                              "or stop what uses it") from None


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; one other than loopback needs --public.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--public", is_flag=True, help="Allow a --host reachable from other machines (no authentication!).")
@click.option("--alias", help="The model's name in the API (default: the file name without .gguf).")
@click.option("-t", "--threads", default=None, type=int,
              help="Threads, >= 1, capped at the cores available (default: the physical cores).")
@click.option("-c", "--ctx-size", default=None, type=int,
              help="Context length, >= 2 (0: the model's; default: min(model's, 2048)).")
@click.option("--cache-type", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="KV cache type.")
@click.option("--access-log", is_flag=True, help="Log every request on standard error.")
@placement_options
def serve(model, host, port, public, alias, threads, ctx_size, cache_type, access_log, rpc, device, n_gpu_layers):
    """Serve MODEL over HTTP with OpenAI's API: /v1/chat/completions (streaming or not),
    /v1/completions, /v1/embeddings (encoders), /v1/models, /health.

    Requests are answered one at a time in arrival order (one KV cache); a conversation that
    grows by a turn reuses the cache. Point any OpenAI client at http://HOST:PORT/v1.

    With --rpc, an RPC server lost while a request runs ends this server: one error line and
    exit status 1 (ggml-rpc cannot recover a broken connection within the process).
    """
    try:
        import uvicorn

        from porter.serve.app import create_app
    except ImportError as exc:
        raise OptionError(f"porter serve needs {exc.name}: pip install 'porter[serve]'") from None
    import porter
    from porter.cli import _check_run_options, _model_context
    from porter.cli_placement import placement_kwargs, show_split

    if not _is_loopback(host) and not public:
        raise OptionError(f"--host {host} is reachable from other machines and the server has no authentication; "
                          "add --public if that is what you want (default: 127.0.0.1)")
    if alias is not None and not alias.strip():
        raise OptionError("--alias is empty; give the name clients should use, or leave it out")
    _, threads = _check_run_options(0, 0.0, 0, 1.0, None, threads, ctx_size)
    if ctx_size == 0:
        ctx_size = _model_context(model)
    where = placement_kwargs(rpc, device, n_gpu_layers)
    _check_port_free(host, port)
    with porter.load(model, n_threads=threads, n_ctx=ctx_size, cache_type=cache_type, **where) as m:
        show_split(m)
        if m.spec.causal:
            m.kv  # allocated now: a cache that cannot fit is refused with its size, before listening
        name = alias or (model.name[:-5] if model.name.endswith(".gguf") else model.name)
        app = create_app(m, name, aliases=(model.name,))
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                                lifespan="on")
        shown = f"[{host}]" if ":" in host else host

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets)
                if self.started:
                    bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                    what = "encoder: /v1/embeddings" if not m.spec.causal else f"context {m.n_ctx}"
                    click.echo(f"porter serve: {name} ({what}) at http://{shown}:{bound}/v1 (Ctrl-C stops)",
                               err=True)

            def handle_exit(self, sig, frame):
                super().handle_exit(sig, frame)
                self._captured_signals.clear()  # stopped on request: exit 0 after the graceful shutdown

        server = _Server(config)
        server.run()
        if not server.started:
            raise OptionError(f"the server could not start on {host}:{port}")
        click.echo("porter serve: stopped", err=True)
