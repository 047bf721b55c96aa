"""Generation on top of :meth:`Model.forward`: prefill the prompt, then decode token by token."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from porter.runtime.sampling import sample


@dataclass
class GenerationStats:
    """Counts and timings of one generation: prompt tokens evaluated (``cached_tokens`` more were
    reused from the cache), tokens generated, the seconds each phase took, the generated ids."""

    prompt_tokens: int = 0  # evaluated (those already in the cache are cached_tokens)
    generated_tokens: int = 0
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        """Prompt tokens evaluated per second (NaN when none took time)."""
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def generate_tps(self) -> float:
        """Tokens generated per second (NaN when none took time)."""
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else float("nan")


class GenerationMixin:
    """``generate_ids`` and ``generate`` for a model with ``forward``, ``reset``, ``kv``, ``n_ctx``,
    ``encode``/``decode`` and ``metadata``."""

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                     n_batch: int = 512, stats: GenerationStats | None = None, cached: int = 0) -> Iterator[int]:
        """Yield new token ids: prefill ``prompt_ids`` in batches of ``n_batch``, then decode one
        token at a time, at most ``max_new_tokens`` (-1: until a stop id or a full context); a
        token in ``stop_ids`` is yielded, then generation ends. Sampling: ``temperature`` 0 is
        greedy, else ``top_k`` (0: off) and ``top_p`` (1: off) filter, ``seed`` makes it
        repeatable. ``stats`` (a GenerationStats) is filled in as it runs. ``cached``: the first
        ids of the prompt are already in the KV cache (a conversation continues; fewer than all)."""
        stats = stats if stats is not None else GenerationStats()
        rng = np.random.default_rng(seed)
        prompt_ids = list(prompt_ids)
        if cached:
            if not 0 < cached < len(prompt_ids) or cached > self.kv.n_past:
                raise ValueError(f"cached={cached}: give 0..{min(len(prompt_ids) - 1, self.kv.n_past)} "
                                 "(prompt ids already in the cache)")
            self.kv.n_past = cached  # later rows are masked, then overwritten
        else:
            self.reset()
        t0 = time.perf_counter()
        logits = None
        for i in range(cached, len(prompt_ids), n_batch):
            logits = self.forward(prompt_ids[i:i + n_batch])
        self.check_finite(logits[-1], prompt_ids)
        stats.prompt_tokens = len(prompt_ids) - cached
        stats.cached_tokens = cached
        stats.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stop = set(int(s) for s in stop_ids)
        if max_new_tokens < 0:
            max_new_tokens = self.n_ctx - len(prompt_ids)
        try:
            for step in range(max_new_tokens):
                tok = sample(logits[-1], temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
                stats.tokens.append(tok)
                stats.generated_tokens += 1
                yield tok
                if tok in stop or step == max_new_tokens - 1 or self.kv.n_past >= self.n_ctx:
                    break
                logits = self.forward([tok])
                self.check_finite(logits[-1], prompt_ids + stats.tokens)
        finally:  # also when the caller stops early (a stop string)
            stats.generate_seconds = time.perf_counter() - t1

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 on_text: Callable[[str], None] | None = None, **kwargs) -> tuple[str, GenerationStats]:
        """Generate text after ``prompt`` (a str, encoded with the tokenizer's special tokens, or
        token ids): returns (the new text, GenerationStats). At most ``max_new_tokens``, stopping
        at the GGUF's end-of-generation ids; ``on_text`` receives each new piece of text as it is
        decoded; other ``kwargs`` go to :meth:`generate_ids` (sampling, ``stop_ids``)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stats = GenerationStats()
        from porter.runtime.chat_session import end_ids

        kwargs.setdefault("stop_ids", end_ids(self.metadata))
        out: list[int] = []
        shown = ""
        for tok in self.generate_ids(ids, max_new_tokens, stats=stats, **kwargs):
            out.append(tok)
            if on_text is not None:
                text = self.decode(out)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
        return self.decode(out), stats
