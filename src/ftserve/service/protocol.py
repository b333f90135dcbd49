"""OpenAI-compatible request and response schemas (the subset ftserve implements, validated strictly)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftserve.engine.protocol import AdapterInfo
from ftserve.engine.request import SpeculationParams


class _Request(BaseModel):
    # Unknown fields are refused by name rather than silently ignored.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Request):
    type: str


class _SamplingFields(_Request):
    """Fields shared by chat and text completions. Extensions beyond OpenAI: top_k, ignore_eos, speculative."""

    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    speculative: SpeculationParams | None = Field(
        None, description="This request's speculative decoding: drafter (none, prompt-lookup, draft-model), num_tokens."
    )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def chat_response(rid: str, model: str, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    rid: str, model: str, delta: dict[str, str], finish: str | None, usage: Usage | None = None
) -> dict[str, Any]:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def completion_response(
    rid: str, model: str, text: str, finish: str | None, usage: Usage | None, stream: bool = False
) -> dict[str, Any]:
    """A text completion, or (stream=True) one chunk of it; a usage-only chunk has no choices."""
    choices = (
        []
        if (stream and usage is not None)
        else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    )
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def model_card(name: str, owned_by: str, parent: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": now(), "owned_by": owned_by, "parent": parent}


# -- adapter admin (ftserve extension) ---------------------------------------------------------------------


class AdapterLoadRequest(_Request):
    """``POST /v1/adapters``: load an adapter by name from the allowed folders (or pin / unpin it)."""

    name: str = Field(min_length=1, max_length=256)
    pinned: bool | None = Field(None, description="Keep it in a compute slot (true) or let it be evicted (false).")
    reload: bool = Field(False, description="Read the folder again even if it is loaded.")


def adapter_card(info: AdapterInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "object": "adapter",
        "version": info.version,
        "residency": info.residency,
        "pinned": info.pinned,
        "rank": info.rank,
        "in_flight": info.in_flight,
        "draining": info.draining,
    }
