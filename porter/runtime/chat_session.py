"""Conversations on a causal model: ``Model.chat(messages)``.

Messages in (transformers' ``[{"role": ..., "content": ...}]``), the assistant's reply out: a
:class:`ChatReply` (a ``str`` that also carries the finish reason and token counts) or, with
``stream=True``, a :class:`ChatStream` of text pieces. Generation stops on every end-of-generation
id the GGUF lists (the EOS and, e.g., ``<|eot_id|>``) and on stop strings.

The KV cache is kept between calls: the next call's prompt is compared with the tokens the cache
holds and only the tokens after their common prefix are evaluated, so a conversation that grows
by one turn processes only that turn. One conversation runs at a time on a model; starting a new
call ends a stream still open.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from porter.errors import ModelError, OptionError
from porter.runtime.generation import GenerationStats


def end_ids(metadata: dict) -> list[int]:
    """The ids that end generation: ``porter.eog_token_ids`` when the GGUF has it, else
    llama.cpp's eos / eot / eom keys."""
    listed = metadata.get("eog_token_ids")
    if listed:
        return [int(i) for i in listed]
    return [int(metadata[k]) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if metadata.get(k) is not None]


class ChatReply(str):
    """The assistant's text; also ``finish_reason`` ("stop": an end id or a stop string, "length":
    max_new_tokens or a full context), ``prompt_tokens`` (all of the rendered prompt),
    ``cached_tokens`` (of those, reused from the cache), ``completion_tokens``, ``tokens`` (the
    generated ids, an end id included) and ``stats`` (timings)."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    tokens: list[int]
    stats: GenerationStats

    def __new__(cls, text: str, **info):
        self = super().__new__(cls, text)
        self.__dict__.update(info)
        return self


class _StopStrings:
    """The reply's text as it grows piece by piece: cut before the first stop string, and shown
    only where it can no longer become the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text, self.shown, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        """Add a piece; the text that is now safe to show (``stopped`` once a stop string appears)."""
        start = len(self.text)
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, start - self.longest + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        safe = len(self.text)
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                safe -= k
                break
        out, self.shown = self.text[self.shown:safe], max(self.shown, safe)
        return out

    def flush(self) -> str:
        """The text not shown yet (at the end: held back, but no stop string followed)."""
        out, self.shown = self.text[self.shown:], len(self.text)
        return out


@dataclass
class _Cached:
    """What the KV cache holds after a call: ids (the last generated one is not evaluated yet),
    valid while nothing else ran the model (its evaluated-token count says)."""

    prompt: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    evaluated: int = -1


class ChatStream:
    """Iterate for the reply's text pieces (multi-byte characters whole); afterwards ``reply``
    is the :class:`ChatReply` (``finish_reason`` and the counts are also read through)."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.reply: ChatReply | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (a stream not iterated to its end keeps the model's conversation
        otherwise); ``reply`` stays None."""
        self._pieces.close()

    def __getattr__(self, name):
        if name in ("finish_reason", "prompt_tokens", "cached_tokens", "completion_tokens", "tokens", "stats"):
            if self.reply is None:
                raise AttributeError(f"{name} is known once the stream is exhausted")
            return getattr(self.reply, name)
        raise AttributeError(name)


class ChatSession:
    """The conversation state of one model (``model.chat`` creates it)."""

    def __init__(self, model):
        self.model = model
        self.cached = _Cached()
        self.active: ChatStream | None = None

    def prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        m = self.model
        if not m.spec.causal:
            raise ModelError("chat needs a causal LM; this is an encoder: use embed (porter embed)")
        if not m.metadata.get("chat_template"):
            raise ModelError("this model has no chat template; use generate with a plain prompt (porter run --no-chat)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise OptionError("chat needs a non-empty list of messages ({'role': ..., 'content': ...})")
        ids = m.encode(m.apply_chat_template(list(messages), tools=tools), add_special_tokens=False)
        if len(ids) >= m.n_ctx:
            raise OptionError(f"the conversation has {len(ids)} tokens, the context holds {m.n_ctx} (and needs room "
                              "for at least one new token); drop earlier messages or load with a larger n_ctx")
        return ids

    def _reusable(self, ids: list[int]) -> int:
        """How many leading ids of the prompt the cache already holds (fewer than all: the last
        prompt token is evaluated for its logits)."""
        m, c = self.model, self.cached
        held = c.prompt + c.out[:-1]  # the last generated id was never evaluated
        if not c.out or m._kv is None or m.tokens_evaluated != c.evaluated or m.kv.n_past != len(held):
            return 0
        n = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        if n < len(held) and m.kv.states:  # a recurrent state cannot be rewound
            return 0
        return n

    def run(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | str = (), tools=None,
            reply_box: ChatStream | None = None) -> Iterator[str]:
        """Check the request and render the prompt now; the returned generator runs the model."""
        if max_new_tokens == 0 or max_new_tokens < -1:
            raise OptionError(f"max_new_tokens={max_new_tokens}: give at least 1 (or -1: until an end or a full context)")
        return self.run_ids(self.prompt_ids(messages, tools), max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, stop=stop, reply_box=reply_box)

    def run_ids(self, ids: list[int], *, max_new_tokens: int = 256, stop: Sequence[str] | str = (),
                reply_box: ChatStream | None = None, **sampling) -> Iterator[str]:
        """:meth:`run` for prompt ids already rendered and tokenized (a plain completion)."""
        if max_new_tokens == 0 or max_new_tokens < -1:
            raise OptionError(f"max_new_tokens={max_new_tokens}: give at least 1 (or -1: until an end or a full context)")
        if not self.model.spec.causal:
            raise ModelError("generation needs a causal LM; this is an encoder: use embed (porter embed)")
        if not ids:
            raise OptionError("the prompt is empty (nothing to continue); give some text")
        if len(ids) >= self.model.n_ctx:
            raise OptionError(f"the prompt has {len(ids)} tokens, the context holds {self.model.n_ctx} (and needs room "
                              "for at least one new token); shorten it or load with a larger n_ctx")
        stops = _StopStrings([stop] if isinstance(stop, str) else list(stop))
        return self._generate(list(ids), stops, reply_box, max_new_tokens=max_new_tokens, **sampling)

    def _generate(self, ids: list[int], stops: _StopStrings, reply_box: ChatStream | None, **sampling):
        from tokenizers.decoders import DecodeStream

        m = self.model
        cached = self._reusable(ids)
        ends = end_ids(m.metadata)
        stats = GenerationStats()
        out: list[int] = []
        self.cached = _Cached()
        before = m.tokens_evaluated
        gen = m.generate_ids(ids, stop_ids=ends, stats=stats, cached=cached, **sampling)
        decoder = DecodeStream(skip_special_tokens=True)
        finish = "length"
        try:
            for tok in gen:
                out.append(tok)
                # the cache now holds the prompt and every generated id but this one
                self.cached = _Cached(ids, out, before + len(ids) - cached + len(out) - 1)
                if tok in ends:
                    finish = "stop"
                    break
                piece = decoder.step(m.tokenizer, tok)
                shown = stops.feed(piece) if piece else ""
                if shown:
                    yield shown
                if stops.stopped:
                    finish = "stop"
                    break
        finally:
            gen.close()
        rest = stops.flush()
        if rest:
            yield rest
        text = stops.text
        reply = ChatReply(text, finish_reason=finish, prompt_tokens=len(ids), cached_tokens=cached,
                          completion_tokens=len(out), tokens=out, stats=stats)
        if reply_box is not None:
            reply_box.reply = reply


def _session(model) -> ChatSession:
    if model._chat is None:
        model._chat = ChatSession(model)
    session = model._chat
    if session.active is not None:  # a stream still open ends here (its cache rows stay reusable)
        session.active.close()
        session.active = None
    return session


def chat(model, messages: list[dict], *, stream: bool = False, **kwargs) -> ChatReply | ChatStream:
    session = _session(model)
    box = ChatStream(iter(()))
    box._pieces = session.run(messages, reply_box=box, **kwargs)
    return _deliver(session, box, stream)


def complete(model, prompt: str | Sequence[int], *, stream: bool = False, **kwargs) -> ChatReply | ChatStream:
    """A plain continuation of ``prompt`` (text is tokenized as :meth:`Model.generate` does, with
    the tokenizer's special tokens), as :func:`chat` returns it: stop strings, end ids, finish
    reason and counts; the KV cache is shared with chat and reused on a common prefix."""
    session = _session(model)
    ids = model.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    box = ChatStream(iter(()))
    box._pieces = session.run_ids(ids, reply_box=box, **kwargs)
    return _deliver(session, box, stream)


def _deliver(session: ChatSession, box: ChatStream, stream: bool) -> ChatReply | ChatStream:
    if stream:
        session.active = box
        return box
    for _ in box:
        pass
    return box.reply


def run_conversation(model, *, system: str | None = None, lines=None, **kwargs) -> list[dict]:
    """``porter chat``: one user message per line of ``lines`` (default: standard input), each
    answer streamed to standard output and its token counts to standard error; ``/exit``, the end
    of input or Ctrl-C ends. Returns the conversation."""
    import sys

    import click

    interactive = lines is None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    messages = [{"role": "system", "content": system}] if system else []
    source = iter(lines) if lines is not None else iter(sys.stdin.buffer.readline, b"")
    try:
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            raw = next(source, None)
            if raw is None:
                break
            try:
                line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                click.secho(f"that line is not valid UTF-8 text (byte {raw[exc.start]:#04x}); type it again",
                            fg="red", err=True)
                continue
            if line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            stream = model.chat(messages, stream=True, **kwargs)
            for piece in stream:
                click.echo(piece, nl=False)
            click.echo()
            r = stream.reply
            messages.append({"role": "assistant", "content": str(r)})
            click.secho(f"[prompt: {r.stats.prompt_tokens} new tokens, {r.cached_tokens} cached, "
                        f"{r.stats.prompt_tps:.1f} tokens/s | answer: {r.completion_tokens} tokens, "
                        f"{r.stats.generate_tps:.1f} tokens/s, {r.finish_reason}]", fg="bright_black", err=True)
    except KeyboardInterrupt:  # Ctrl-C ends the conversation, not with a traceback
        click.echo(err=True)
    return messages
