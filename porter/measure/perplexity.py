"""Perplexity with llama-perplexity's conventions (llama.cpp ``tools/perplexity``, default mode).

- The whole text is tokenized once, with the tokenizer's special tokens (a BOS in front when the
  model adds one).
- It is cut into ``n_chunk = len(tokens) // n_ctx`` chunks of ``n_ctx`` tokens (the rest is
  dropped; ``chunks`` caps the number); a text shorter than ``2 * n_ctx`` tokens is refused.
- Each chunk runs alone, from an empty cache, in batches of ``n_batch`` tokens; when the model
  adds a BOS, the chunk's first token is replaced by BOS.
- Only the second half is scored: with ``first = n_ctx // 2``, the logits at positions
  ``first .. n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1`` (``n_ctx - first - 1`` tokens
  per chunk), so every scored token sees at least half a context.
- PPL = exp(mean NLL); the error is ``PPL * sqrt(var(NLL) / (count - 1))``, as llama.cpp prints
  it ("Final estimate: PPL = ... +/- ..."), and the running estimate after each chunk
  ``[1]x,[2]y,...``.

Sliding-window mode (``--ppl-stride S``, llama-perplexity's ``perplexity_v2``):

- The text is tokenized the same way; the window holds ``W = n_ctx + S // 2`` tokens (llama-perplexity
  enlarges its context by half a stride); a text shorter than ``2 * W`` tokens is refused, and the
  stride must be below ``W``.
- Window ``i`` is ``tokens[i*S : i*S + W]``, for ``i < ceil((len(tokens) - W) / S)`` (``chunks``
  caps the count), each run alone from an empty cache in batches of ``n_batch``. Nothing is replaced
  by BOS: llama-perplexity writes BOS into its token array only after the batch was decoded, so its
  windows run on the text's own tokens, as here.
- Each window scores its last ``S`` tokens: the logits at positions ``W - S - 1 .. W - 2`` predict
  tokens ``W - S .. W - 1``. Consecutive windows score consecutive stretches, so every scored token
  sees at least ``W - S`` tokens of context (the text's first ``W - S`` tokens are never scored).
- This is the strided perplexity of transformers' "Perplexity of fixed-length models" guide on
  these windows (labels of all but each window's last ``S`` tokens ignored).
- llama-perplexity itself sizes its context as ``max(1, n_batch // n_ctx) * n_ctx + S // 2`` and then
  rounds it up to a multiple of 256, and the window is that whole context: its numbers are these when
  ``-b <= -c`` and ``-c + S // 2`` is a multiple of 256 (``-c 448 --ppl-stride 128 -b 448``: W = 512).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from porter.errors import ModelError, OptionError

DEFAULT_CTX = 512  # llama-perplexity's examples and published numbers use -c 512
DEFAULT_BATCH = 2048


@dataclass
class PerplexityResult:
    """What :func:`perplexity` measured: ``ppl`` and ``ppl_error`` (llama-perplexity's final
    estimate), ``running`` (the estimate after each chunk or window), ``count`` scored tokens;
    ``n_ctx`` is the chunk or window length in tokens, ``stride`` 0 for the chunked mode."""

    n_ctx: int
    n_chunks: int
    n_text_tokens: int
    stride: int = 0
    count: int = 0  # scored tokens
    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    running: list[float] = field(default_factory=list)  # PPL after each chunk

    @property
    def ppl(self) -> float:
        """exp(mean negative log-likelihood) over the scored tokens."""
        return math.exp(self.nll_sum / self.count)

    @property
    def ppl_error(self) -> float:
        """The standard error llama-perplexity prints after "+/-" (NaN with fewer than two tokens)."""
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else float("nan")

    def summary(self) -> str:
        """llama-perplexity's last line: ``Final estimate: PPL = x +/- e``."""
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"


def chunks_of(tokens: Sequence[int], n_ctx: int, n_chunks: int = -1, bos_id: int | None = None) -> list[list[int]]:
    """The chunks llama-perplexity evaluates (``bos_id``: the first token of each is replaced by it)."""
    if n_ctx < 4:
        raise OptionError(f"-c {n_ctx}: the context must hold at least 4 tokens (only the second half is scored)")
    if len(tokens) < 2 * n_ctx:
        raise OptionError(f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at least "
                          f"{2 * n_ctx} (two chunks): give a longer text or a smaller -c")
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    if n == 0:
        raise OptionError("--chunks 0: give a number of chunks >= 1 (or -1 for all)")
    out = []
    for i in range(n):
        chunk = [int(t) for t in tokens[i * n_ctx:(i + 1) * n_ctx]]
        if bos_id is not None:
            chunk[0] = int(bos_id)
        out.append(chunk)
    return out


def strided_window(n_ctx: int, stride: int) -> int:
    """The window length of the sliding-window mode: ``n_ctx + stride // 2``, refusing a stride
    that is not positive or not below the window."""
    if stride < 1:
        raise OptionError(f"--ppl-stride {stride}: give a stride of at least 1 token (or 0 for the chunked mode)")
    if n_ctx < 2:
        raise OptionError(f"-c {n_ctx}: the context must hold at least 2 tokens")
    window = n_ctx + stride // 2
    if stride >= window:
        raise OptionError(f"--ppl-stride {stride}: each window of -c + stride/2 = {window} tokens scores its last "
                          f"{stride} tokens, which must leave at least one token of context: give a stride below "
                          f"{2 * n_ctx - 1} (or a larger -c)")
    return window


def strided_windows(tokens: Sequence[int], n_ctx: int, stride: int, n_chunks: int = -1) -> list[list[int]]:
    """The windows llama-perplexity's sliding-window mode evaluates: ``tokens[i*stride : i*stride + W]``
    with ``W = strided_window(n_ctx, stride)`` (see the module docstring)."""
    window = strided_window(n_ctx, stride)
    if len(tokens) < 2 * window:
        raise OptionError(f"the text has {len(tokens)} tokens; strided perplexity with windows of {window} tokens "
                          f"(-c {n_ctx} + stride/2) needs at least {2 * window}: give a longer text or a smaller "
                          "-c / --ppl-stride")
    n_max = -(-(len(tokens) - window) // stride)
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    if n == 0:
        raise OptionError("--chunks 0: give a number of windows >= 1 (or -1 for all)")
    return [[int(t) for t in tokens[i * stride:i * stride + window]] for i in range(n)]


def scored_nll(logits: np.ndarray, chunk: Sequence[int], n_scored: int | None = None) -> np.ndarray:
    """Negative log-likelihoods (float64) of the last ``n_scored`` tokens of ``chunk`` (default: its
    second half, ``len(chunk) - len(chunk) // 2 - 1`` tokens) given ``logits`` (one row per position
    of the chunk)."""
    n_ctx = len(chunk)
    first = n_ctx // 2 if n_scored is None else n_ctx - n_scored - 1
    rows = np.asarray(logits[first:n_ctx - 1], dtype=np.float64)
    targets = np.asarray(chunk[first + 1:], dtype=np.int64)
    top = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return lse - rows[np.arange(len(targets)), targets]


def bos_for(model) -> int | None:
    """The BOS id a chunk starts with: the model's, when its tokenizer adds one (llama.cpp's
    ``tokenizer.ggml.add_bos_token``)."""
    bos = model.metadata.get("bos_token_id")
    return int(bos) if model.metadata.get("add_bos_token") and bos is not None else None


def perplexity(model, tokens: Sequence[int], n_ctx: int = DEFAULT_CTX, *, n_chunks: int = -1,
               n_batch: int = DEFAULT_BATCH, bos_id: int | None = None, stride: int = 0,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """llama-perplexity's estimate over ``tokens`` (see the module docstring) on a porter model.

    ``tokens``: the text's ids (with the tokenizer's special tokens); ``n_ctx``: ``-c``;
    ``n_chunks``: at most this many chunks or windows (-1: all); ``n_batch``: tokens per forward
    pass; ``bos_id``: the id each chunk starts with in the chunked mode (:func:`bos_for`; unused by
    the sliding-window mode, as in llama-perplexity); ``stride`` > 0: the sliding-window mode
    (``--ppl-stride``); ``on_chunk(i, running_ppl)`` is called after each chunk or window.
    Returns a :class:`PerplexityResult`; bad options raise :class:`~porter.errors.OptionError`.
    """
    if not model.spec.causal:
        raise ModelError("perplexity needs a causal language model (this graph is an encoder)")
    if n_batch < 1:
        raise OptionError(f"-b {n_batch}: give a batch of at least 1 token")
    if stride < 0:
        raise OptionError(f"--ppl-stride {stride}: give a stride of at least 1 token (or 0 for the chunked mode)")
    if stride:
        chunks = strided_windows(tokens, n_ctx, stride, n_chunks)
        n_scored = stride
    else:
        chunks = chunks_of(tokens, n_ctx, n_chunks, bos_id)
        n_scored = None
    window = len(chunks[0])
    if window > model.n_ctx:
        what = f"-c {n_ctx} + stride/2 = {window}" if stride else f"-c {n_ctx}"
        raise OptionError(f"{what} exceeds the context the model was loaded with ({model.n_ctx} positions); "
                          "lower -c")
    result = PerplexityResult(window, len(chunks), len(tokens), stride)
    for i, chunk in enumerate(chunks):
        model.reset()
        logits = np.concatenate([model.forward(chunk[s:s + n_batch], all_logits=True)
                                 for s in range(0, window, n_batch)])
        nll = scored_nll(logits, chunk, n_scored)
        if not np.isfinite(nll).all():
            model.check_finite(logits[-1], chunk)
            raise ModelError(f"chunk {i + 1}: the model's log-likelihoods are not finite")
        result.count += nll.size
        result.nll_sum += float(nll.sum())
        result.nll2_sum += float((nll * nll).sum())
        result.running.append(math.exp(result.nll_sum / result.count))
        if on_chunk is not None:
            on_chunk(i + 1, result.running[-1])
    model.reset()
    return result


__all__ = ["DEFAULT_BATCH", "DEFAULT_CTX", "PerplexityResult", "bos_for", "chunks_of", "perplexity", "scored_nll",
           "strided_window", "strided_windows"]


def transformers_perplexity(hf_model, chunks: list[list[int]]) -> float:
    """The reference: exp(mean NLL) over the second half of each chunk from transformers' own
    logits (float64 log-softmax), for tests and benches to compare with."""
    import torch

    nll = []
    with torch.no_grad():
        for chunk in chunks:
            logits = hf_model(torch.tensor([chunk])).logits[0].double()
            first = len(chunk) // 2
            nll.append(torch.nn.functional.cross_entropy(logits[first:-1], torch.tensor(chunk[first + 1:]),
                                                         reduction="none"))
    return math.exp(torch.cat(nll).mean().item())


def transformers_strided_perplexity(hf_model, windows: list[list[int]], stride: int) -> float:
    """The reference for the sliding-window mode, as transformers' "Perplexity of fixed-length
    models" guide computes it: each window's labels are its ids with all but the last ``stride``
    set to -100, and the model's own loss (mean NLL of the shifted labels) is weighted by the
    tokens it scored."""
    import torch

    nll_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for window in windows:
            input_ids = torch.tensor([window])
            labels = input_ids.clone()
            labels[:, :-stride] = -100
            loss = hf_model(input_ids, labels=labels).loss
            scored = int((labels[:, 1:] != -100).sum())  # the model shifts the labels by one
            nll_sum += float(loss) * scored
            n_tokens += scored
    return math.exp(nll_sum / n_tokens)
