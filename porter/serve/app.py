"""The OpenAI-compatible HTTP API over one loaded model (FastAPI).

One model, one conversation state: every model call runs on a single worker thread, and a
request holds an asyncio lock from its first model call to its last (a stream until its end),
so concurrent requests queue in arrival order and never share the KV cache mid-answer. A client
that goes away mid-stream ends its generation and frees the lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import AsyncIterator, Callable

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from porter.errors import PorterError
from porter.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, _Sampling


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class ModelWorker:
    """Serialized access to one model: calls run on one thread; ``lock`` is held per request."""

    def __init__(self, model):
        self.model = model
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="porter-model")
        self.lock = asyncio.Lock()

    async def call(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))

    async def call_shielded(self, fn: Callable, *args):
        """A call that completes even while the request is being cancelled (cleanup)."""
        with anyio.CancelScope(shield=True):
            return await self.call(fn, *args)


class _Stream(StreamingResponse):
    """A streaming response that runs ``cleanup`` when it ends, however it ends (also when the
    client disconnected, or before the first chunk)."""

    def __init__(self, content, cleanup: Callable, **kwargs):
        super().__init__(content, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.cleanup()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


def create_app(model, name: str, *, aliases: tuple[str, ...] = ()) -> FastAPI:
    """The API for ``model`` (a loaded :class:`porter.runtime.model.Model`), listed as ``name``;
    requests may name it ``name`` or one of ``aliases`` (or leave ``model`` out)."""
    worker = ModelWorker(model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.executor.shutdown(wait=True)

    app = FastAPI(title="porter", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    known = {name, *aliases}
    created = int(time.time())
    causal = bool(model.spec.causal)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        parts = []
        for e in errors[:5]:
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return APIError(400, "; ".join(parts) or "invalid request", param=".".join(loc) or None,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += " (porter serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health)"
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(PorterError)
    async def _porter(request, exc: PorterError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        logging.getLogger("porter").error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def check(req, kind: str) -> None:
        if req.model is not None and req.model not in known:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server has {name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if kind == "embed" and causal:
            raise APIError(400, f"{name} is a causal LM: it generates text (/v1/chat/completions, /v1/completions); "
                                "embeddings need an encoder model", param="model")
        if kind != "embed" and not causal:
            raise APIError(400, f"{name} is an encoder: it embeds text, it does not generate; use /v1/embeddings",
                           param="model")
        if isinstance(req, _Sampling):
            if req.n != 1:
                raise APIError(400, f"n={req.n}: porter answers one choice per request; send n=1 (or leave it out) "
                                    "and repeat the request for more", param="n")
            if req.logprobs not in (None, False):
                raise APIError(400, "logprobs are not supported by porter's server; leave them out", param="logprobs")

    @app.get("/health")
    async def health():  # busy and tokens_evaluated (porter's): what the model is doing
        return {"status": "ok", "busy": worker.lock.locked(), "tokens_evaluated": model.tokens_evaluated}

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "porter"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id not in known:
            raise APIError(404, f"the model {model_id!r} does not exist here; this server has {name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def answer(start: Callable, stream: bool, chunk: Callable, final: Callable, include_usage: bool):
        """Run ``start()`` under the lock: the whole reply, or an SSE stream of its pieces. The
        request is checked (and its prompt rendered) before a stream starts, so a bad one gets
        its 4xx answer rather than a stream."""
        if not stream:
            async with worker.lock:
                reply = await worker.call(start, stream=False)
            return final(reply)

        await worker.lock.acquire()  # released by cleanup(), when the response ends however it ends
        try:
            pieces = await worker.call(start, stream=True)
        except BaseException:
            worker.lock.release()
            raise

        async def cleanup():
            try:
                if pieces.reply is None:  # cut short (the client went away): stop generating now
                    await worker.call_shielded(pieces.close)
            finally:
                worker.lock.release()

        async def events() -> AsyncIterator[str]:
            yield _sse(chunk(None, None))  # the role first, as OpenAI's stream
            try:
                while (piece := await worker.call(next, pieces, None)) is not None:
                    yield _sse(chunk(piece, None))
            except PorterError as exc:  # during generation (e.g. non-finite logits): told in the stream
                yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
                return
            reply = pieces.reply
            yield _sse(chunk("", reply.finish_reason))
            if include_usage:
                yield _sse({**chunk("", None), "choices": [], "usage": _usage(reply)})
            yield "data: [DONE]\n\n"

        return _Stream(events(), cleanup, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check(req, "chat")
        messages = [m.as_dict() for m in req.messages]
        sampling = req.sampling()
        start = partial(model.chat, messages, tools=req.tools, **sampling)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": now, "model": name, "system_fingerprint": None}

        def chunk(piece, finish):
            delta = {"role": "assistant", "content": ""} if piece is None else ({"content": piece} if piece else {})
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(reply):
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": str(reply)},
                                 "logprobs": None, "finish_reason": reply.finish_reason}],
                    "usage": _usage(reply)}

        return await answer(start, req.stream, chunk, final, req.include_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check(req, "complete")
        from porter.runtime.chat_session import complete

        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"{len(prompt)} prompts: porter answers one prompt per request; send them "
                                    "one at a time", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and any(not 0 <= t < model.n_vocab for t in prompt):
            raise APIError(400, f"the prompt holds token ids outside the vocabulary (0..{model.n_vocab - 1})",
                           param="prompt")
        echo = (prompt if isinstance(prompt, str) else model.decode(prompt)) if req.echo else ""
        start = partial(complete, model, prompt, **req.sampling())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name,
                "system_fingerprint": None}

        def choice(text, finish):
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def chunk(piece, finish):
            return {**head, "object": "text_completion", "choices": [choice(echo if piece is None else piece, finish)]}

        def final(reply):
            return {**head, "object": "text_completion", "choices": [choice(echo + str(reply), reply.finish_reason)],
                    "usage": _usage(reply)}

        return await answer(start, req.stream, chunk, final, req.include_usage)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        check(req, "embed")
        items = req.input
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items or any(len(x) == 0 for x in items):
            raise APIError(400, "input is empty: give a text (or token ids), or a list of them", param="input")
        def run():
            vectors = model.embed(list(items))
            counts = [min(len(model.encode(x)), model.max_seq_length) if isinstance(x, str) else len(x)
                      for x in items]
            return vectors, sum(counts)

        async with worker.lock:
            vectors, n_tokens = await worker.call(run)
        if req.dimensions is not None and req.dimensions != vectors.shape[1]:
            raise APIError(400, f"dimensions={req.dimensions}: this model's embeddings have {vectors.shape[1]} "
                                "dimensions; leave dimensions out", param="dimensions")
        data = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, dtype="<f4")
            emb = base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app
