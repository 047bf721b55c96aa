"""The request bodies the server accepts: OpenAI's fields, checked by pydantic.

Fields OpenAI defines that porter does not act on (``user``, ``presence_penalty``, ...) are
accepted and ignored, as llama.cpp's server does; ones that would change the answer in a way
porter cannot honour (``n`` > 1, ``logprobs``) are refused by the endpoints.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # llama.cpp's extension (0 = all candidates)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1)
    logprobs: Any = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def sampling(self, max_tokens: int | None) -> dict:
        return {"max_new_tokens": max_tokens or -1, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop": self.stop or []}

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, name: passed to the template

    role: str = Field(min_length=1)
    content: str | list[_TextPart] | None = None

    def as_dict(self) -> dict:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # text parts are joined, as one text message
            d["content"] = "".join(p.text for p in self.content)
        return d


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    def sampling(self, max_tokens: int | None = None) -> dict:
        return super().sampling(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    def sampling(self, max_tokens: int | None = None) -> dict:
        return super().sampling(self.max_tokens)


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
