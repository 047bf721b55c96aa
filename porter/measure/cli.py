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
@click.option("-t", "--threads", default=None, type=int, help="Threads, >= 1 (default: the physical cores).")
def perplexity(model, text_file, python_reference, n_ctx, n_chunks, n_batch, threads):
    """Perplexity of MODEL on a text, with llama-perplexity's conventions: chunks of -c tokens, each
    from an empty cache (its first token BOS when the model adds one), the second half of each
    scored; prints the running estimate [1]x,[2]y,... and the final estimate with its error."""
    import porter
    from porter.cli import _check_threads
    from porter.measure.perplexity import bos_for, perplexity as measure

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
    with porter.load(model, n_threads=threads, n_ctx=max(n_ctx, 2)) as m:
        tokens = m.encode(text, add_special_tokens=True)
        n = len(tokens) // max(n_ctx, 1)
        click.echo(f"perplexity: tokenized the text into {len(tokens)} tokens; calculating perplexity over "
                   f"{n if n_chunks < 0 else min(n, n_chunks)} chunks, n_ctx={n_ctx}, batch_size={n_batch}", err=True)
        result = measure(m, tokens, n_ctx, n_chunks=n_chunks, n_batch=n_batch, bos_id=bos_for(m),
                         on_chunk=lambda i, ppl: click.echo(f"[{i}]{ppl:.4f},", nl=False))
    click.echo()
    click.echo(result.summary())
