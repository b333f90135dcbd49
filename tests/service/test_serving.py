"""The /v1 routes and serving logic over a scripted fake engine (unit tests of our own logic)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from ftserve.config import ServiceConfig
from ftserve.engine.base import DEADLINE_EXCEEDED
from ftserve.engine.lora import AdapterError
from ftserve.engine.protocol import EngineStats
from ftserve.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
)
from ftserve.service.routes import build_app
from ftserve.service.serving import OpenAIServing

BASE = "tiny"


class FakeTokenizer:
    vocab_size = 1000

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 900 + 1 for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in token_ids)


Script = Callable[[GenerationRequest], list[GenerationOutput]]


def words(*parts: str, finish: FinishReason = FinishReason.STOP, error: str | None = None) -> Script:
    def script(req: GenerationRequest) -> list[GenerationOutput]:
        n = len(req.prompt_token_ids)
        outs = [GenerationOutput(req.request_id, p, [i], n, i + 1) for i, p in enumerate(parts)]
        outs.append(GenerationOutput(req.request_id, "", [], n, len(parts), finish, error))
        return outs

    return script


class FakeEngine:
    max_model_len = 64
    on_step = None

    def __init__(self, script: Script | None = None, refuse: Exception | None = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.script = script or words("Hello", " world")
        self.refuse = refuse
        self.requests: list[GenerationRequest] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0)

    def adapters(self) -> list[str]:
        return []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        for out in self.script(request):
            yield out

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: object) -> object:
        raise AssertionError("no adapter should be loaded by these tests")


def call(engine: FakeEngine, path: str, body: Any, raw: bytes | None = None) -> httpx.Response:
    app = build_app()
    app.state.serving = OpenAIServing(engine, ServiceConfig(served_model_name=BASE))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            content = raw if raw is not None else json.dumps(body).encode()
            return await client.post(path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": BASE, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(response: httpx.Response) -> list[str]:
    text = response.text
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    for needle in needles:
        assert needle in body["error"]["message"]
    return body["error"]


def test_chat_returns_text_and_usage() -> None:
    engine = FakeEngine()
    res = call(engine, "/chat/completions", chat(max_tokens=5))
    assert res.status_code == 200
    body = res.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    prompt_len = len(engine.requests[0].prompt_token_ids)
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 2, "total_tokens": prompt_len + 2}
    assert engine.requests[0].params.max_tokens == 5


def test_stream_frames_are_sse_and_end_with_done() -> None:
    res = call(FakeEngine(), "/chat/completions", chat(stream=True, stream_options={"include_usage": True}))
    assert res.headers["content-type"].startswith("text/event-stream")
    events = sse_events(res)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello world"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_engine_error_mid_stream_sends_an_error_frame() -> None:
    engine = FakeEngine(words("partial", finish=FinishReason.ERROR, error="RuntimeError: boom"))
    events = sse_events(call(engine, "/chat/completions", chat(stream=True)))
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "boom" in error["message"] and error["type"] == "server_error"


def test_engine_error_without_stream_is_a_500_body() -> None:
    engine = FakeEngine(words("x", finish=FinishReason.ERROR, error="RuntimeError: boom"))
    assert_error(call(engine, "/completions", {"model": BASE, "prompt": "hi"}), 500, "boom")


def rejected(reason: str) -> float:
    labels = {"adapter": "base", "protocol": "rest", "reason": reason}
    return REGISTRY.get_sample_value("ftserve_request_rejected_total", labels) or 0.0


def test_full_queue_is_a_429_counted_as_a_refusal_unlike_bad_input() -> None:
    before = rejected("queue_full")
    engine = FakeEngine(refuse=QueueFullError("queue is full (2 waiting requests)"))
    assert_error(call(engine, "/chat/completions", chat()), 429, "queue is full")
    assert rejected("queue_full") == before + 1
    assert_error(call(FakeEngine(), "/chat/completions", {"model": BASE}), 400, "messages")
    assert rejected("queue_full") == before + 1  # the client's mistake is not the server's unavailability


def test_a_failed_adapter_load_is_counted(tmp_path: Path) -> None:
    class Refusing(FakeEngine):
        async def load_adapter(self, name: str, path: object) -> object:
            raise AdapterError(f"{path}: adapter_model.safetensors is missing")

    def failures() -> float:
        return REGISTRY.get_sample_value("ftserve_adapter_load_failures_total", {"adapter": "broken"}) or 0.0

    serving = OpenAIServing(Refusing(), ServiceConfig(served_model_name=BASE))
    before = failures()
    with pytest.raises(AdapterError, match="missing"):
        asyncio.run(serving.load_adapter("broken", tmp_path))
    assert failures() == before + 1


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        (chat(model="nope"), 404, ["'nope'", BASE]),
        ({"model": BASE}, 400, ["messages"]),
        (chat(messages=[]), 400, ["messages"]),
        (chat(max_tokens=0), 400, ["1024"]),
        (chat(max_tokens=5000), 400, ["1024", "5000"]),
        (chat(n=2), 400, ["n=2"]),
        (chat(temperature=3), 400, ["temperature"]),
        (chat(frobnicate=1), 400, ["frobnicate"]),
        (chat(logprobs=True), 400, ["logprobs"]),
        (chat(stop=["a", "b", "c", "d", "e"]), 400, ["stop"]),
        (chat(messages=[{"role": "user", "content": "x" * 80}]), 400, [str(80 + len("<user>")), "64"]),
        (chat(max_tokens=60), 400, ["64", "60"]),
        ({"model": BASE, "prompt": "hi", "echo": True}, 400, ["echo"]),
    ],
)
def test_bad_requests_get_openai_errors(body: dict[str, Any], status: int, needles: list[str]) -> None:
    path = "/completions" if "prompt" in body else "/chat/completions"
    engine = FakeEngine()
    assert_error(call(engine, path, body), status, *needles)
    assert engine.requests == []  # nothing reached the engine


def test_invalid_json_and_non_object_bodies_are_400() -> None:
    assert_error(call(FakeEngine(), "/chat/completions", None, raw=b"{oops"), 400, "JSON")
    assert_error(call(FakeEngine(), "/chat/completions", [1, 2]), 400, "object")


def test_default_max_tokens_fits_the_context_window() -> None:
    engine = FakeEngine()
    res = call(engine, "/completions", {"model": BASE, "prompt": "x" * 60})
    assert res.status_code == 200
    assert engine.requests[0].params.max_tokens == engine.max_model_len - 60


def test_finished_requests_are_counted_by_reason() -> None:
    labels = {"adapter": "base", "protocol": "rest", "finished_reason": "length"}

    def count() -> float:
        return REGISTRY.get_sample_value("ftserve_request_success_total", labels) or 0.0

    before = count()
    call(FakeEngine(words("a", finish=FinishReason.LENGTH)), "/completions", {"model": BASE, "prompt": "hi"})
    assert count() == before + 1


def test_deployment_sampling_defaults_fill_omitted_fields() -> None:
    engine = FakeEngine()
    app_config = ServiceConfig(served_model_name=BASE, sampling={"temperature": 0.0, "top_p": 0.5, "top_k": 3})
    app = build_app()
    app.state.serving = OpenAIServing(engine, app_config)

    async def go(body: dict[str, Any]) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.post("/chat/completions", json=body)).status_code == 200

    asyncio.run(go(chat()))
    asyncio.run(go(chat(temperature=0.7, top_p=1.0, top_k=9)))
    omitted, given = (r.params for r in engine.requests)
    assert (omitted.temperature, omitted.top_p, omitted.top_k) == (0.0, 0.5, 3)
    assert (given.temperature, given.top_p, given.top_k) == (0.7, 1.0, 9)


def test_deadline_exceeded_is_a_504() -> None:
    engine = FakeEngine(words("x", finish=FinishReason.ABORT, error=DEADLINE_EXCEEDED))
    assert_error(call(engine, "/chat/completions", chat()), 504, "deadline")


def test_models_lists_adapters_found_in_the_allowed_folders(tmp_path: Path) -> None:
    (tmp_path / "support-router").mkdir()
    (tmp_path / "support-router" / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    serving = OpenAIServing(FakeEngine(), ServiceConfig(served_model_name=BASE, adapter_dirs=[tmp_path]))
    assert [card["id"] for card in serving.list_models()["data"]] == [BASE, "support-router"]
