"""`porter perplexity` and `porter bench`: llama-perplexity's and llama-bench's measurements."""

from __future__ import annotations

from pathlib import Path

import click

from porter.errors import OptionError


@click.command("perplexity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-f", "--file", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The text to score (UTF-8).")
@click.option("--python-reference", is_flag=True,
              help="Score the Python Language Reference that ships with Python (pydoc_data.topics) instead of -f.")
@click.option("-c", "--ctx-size", "n_ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", "n_chunks", default=-1, show_default=True, help="Chunks to score (-1: all the text holds).")
@click.option("-b", "--batch-size", "n_batch", default=2048, show_default=True, help="Tokens per forward pass.")
@click.option("--ppl-stride", "stride", default=0, show_default=True,
              help="Sliding-window mode: windows of -c + stride/2 tokens, stride apart, each scoring its last "
                   "stride tokens (0: chunked mode).")
@click.option("-t", "--threads", default=None, type=int, help="Threads, >= 1 (default: the physical cores).")
def perplexity(model, text_file, python_reference, n_ctx, n_chunks, n_batch, stride, threads):
    """Perplexity of MODEL on a text, with llama-perplexity's conventions: chunks of -c tokens, each
    from an empty cache (its first token BOS when the model adds one), the second half of each
    scored; prints the running estimate [1]x,[2]y,... and the final estimate with its error.
    With --ppl-stride S, llama-perplexity's sliding window: windows of -c + S/2 tokens starting S
    apart, each from an empty cache, each scoring its last S tokens."""
    import porter
    from porter.cli import _check_threads
    from porter.measure.perplexity import bos_for, perplexity as measure, strided_window

    if stride < 0:
        raise OptionError(f"--ppl-stride {stride}: give a stride of at least 1 token (or 0 for the chunked mode)")
    window = strided_window(n_ctx, stride) if stride else n_ctx  # refuses a bad stride before loading
    if bool(text_file) == python_reference:
        raise OptionError("give the text to score: -f FILE, or --python-reference (one of them)")
    if text_file:
        try:
            text = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise OptionError(f"{text_file} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    else:
        from porter.measure.text import python_reference as reference

        text = reference()
    threads = _check_threads(threads)
    with porter.load(model, n_threads=threads, n_ctx=max(window, 2)) as m:
        tokens = m.encode(text, add_special_tokens=True)
        if stride:
            n = max(0, -(-(len(tokens) - window) // stride))
            mode = f"windows, n_ctx={window} (-c {n_ctx} + stride/2), stride={stride}"
        else:
            n = len(tokens) // max(n_ctx, 1)
            mode = f"chunks, n_ctx={n_ctx}"
        click.echo(f"perplexity: tokenized the text into {len(tokens)} tokens; calculating perplexity over "
                   f"{n if n_chunks < 0 else min(n, n_chunks)} {mode}, batch_size={n_batch}", err=True)
        result = measure(m, tokens, n_ctx, n_chunks=n_chunks, n_batch=n_batch, bos_id=bos_for(m), stride=stride,
                         on_chunk=lambda i, ppl: click.echo(f"[{i}]{ppl:.4f},", nl=False))
    click.echo()
    click.echo(result.summary())


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--n-prompt", default="512", show_default=True, help="Prompt lengths (comma-separated; 0: none).")
@click.option("-n", "--n-gen", default="128", show_default=True, help="Tokens generated (comma-separated; 0: none).")
@click.option("-pg", "n_pg", multiple=True, metavar="PP,TG",
              help="A prompt of PP tokens then TG generated after it, timed together (test pp<PP>+tg<TG>; "
                   "repeatable).")
@click.option("-r", "--repetitions", "reps", default=5, show_default=True, help="Runs of each test (after one warm-up).")
@click.option("-t", "--threads", default=None, help="Thread counts (comma-separated; default: the physical cores).")
@click.option("-b", "--batch-size", "n_batch", default=2048, show_default=True, help="Tokens per forward pass of a prompt.")
@click.option("-o", "--output", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
def bench(model, n_prompt, n_gen, n_pg, reps, threads, n_batch, fmt):
    """Prompt (pp) and generation (tg) speed of MODEL, llama-bench's table: t/s as the mean ±
    standard deviation over -r runs, for every -p, -n, -pg and -t value."""
    from porter.cli import _check_threads
    from porter.measure import bench as b
    from porter.runtime.core import default_threads

    prompts = b.parse_list(n_prompt, "-p", 0)
    gens = b.parse_list(n_gen, "-n", 0)
    pairs = b.parse_pairs(n_pg)
    counts = b.parse_list(threads, "-t", 1) if threads else [default_threads()]
    counts = [_check_threads(t) for t in counts]
    if n_batch < 1:
        raise OptionError(f"-b {n_batch}: give a batch of at least 1 token")
    results = b.bench(model, prompts, gens, reps, counts, n_batch, n_pg=pairs,
                      on_result=lambda r: click.echo(f"{r.test} at {r.n_threads} threads: {r.avg_ts:.2f} t/s", err=True))
    click.echo({"md": b.markdown, "csv": b.to_csv, "json": b.to_json}[fmt](results), nl=False)
