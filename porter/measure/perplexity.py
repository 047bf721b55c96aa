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

llama-perplexity's sliding-window mode (``--ppl-stride``) is not implemented.
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
    n_ctx: int
    n_chunks: int
    n_text_tokens: int
    count: int = 0  # scored tokens
    nll_sum: float = 0.0
    nll2_sum: float = 0.0
    running: list[float] = field(default_factory=list)  # PPL after each chunk

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count)

    @property
    def ppl_error(self) -> float:
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else float("nan")

    def summary(self) -> str:
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


def scored_nll(logits: np.ndarray, chunk: Sequence[int]) -> np.ndarray:
    """Negative log-likelihoods (float64) of the second half of ``chunk`` given ``logits``
    (one row per position of the chunk)."""
    n_ctx = len(chunk)
    first = n_ctx // 2
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
               n_batch: int = DEFAULT_BATCH, bos_id: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """llama-perplexity's estimate over ``tokens`` (see the module docstring) on a porter model."""
    if not model.spec.causal:
        raise ModelError("perplexity needs a causal language model (this graph is an encoder)")
    if n_batch < 1:
        raise OptionError(f"-b {n_batch}: give a batch of at least 1 token")
    if n_ctx > model.n_ctx:
        raise OptionError(f"-c {n_ctx} exceeds the context the model was loaded with ({model.n_ctx} positions); "
                          "lower -c")
    chunks = chunks_of(tokens, n_ctx, n_chunks, bos_id)
    result = PerplexityResult(n_ctx, len(chunks), len(tokens))
    for i, chunk in enumerate(chunks):
        model.reset()
        logits = np.concatenate([model.forward(chunk[s:s + n_batch], all_logits=True)
                                 for s in range(0, n_ctx, n_batch)])
        nll = scored_nll(logits, chunk)
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


__all__ = ["DEFAULT_BATCH", "DEFAULT_CTX", "PerplexityResult", "bos_for", "chunks_of", "perplexity", "scored_nll"]


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
