"""A small client for both APIs (``ftserve client ...``): stream a completion, list models, manage adapters.

gRPC talks to ``ftserve.v1.Generation``; REST to the OpenAI routes (streamed as server-sent events) and
``/v1/adapters``. Both return the same shapes, so scripts and tests can switch protocol with one flag.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import httpx

from ftserve.v1 import ftserve_pb2 as pb
from ftserve.v1 import ftserve_pb2_grpc as pb_grpc


class ClientError(RuntimeError):
    """The server refused or failed a call; ``code`` is the gRPC status name or the HTTP status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Completion:
    """What a streamed completion came to."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass(frozen=True)
class Ask:
    """One generation request: chat messages (role, content) or a raw prompt, plus sampling."""

    model: str
    messages: list[tuple[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    drafter: str | None = None  # speculative decoding for this request: none, prompt-lookup or draft-model
    draft_tokens: int | None = None  # most tokens drafted per step

    def speculative(self) -> dict[str, Any]:
        """The request's own speculative-decoding settings (empty: the deployment's)."""
        given = {"drafter": self.drafter, "num_tokens": self.draft_tokens}
        return {k: v for k, v in given.items() if v is not None}


class Client(Protocol):
    def stream(self, ask: Ask, completion: Completion) -> Iterator[str]:
        """Yield text pieces as they arrive; fill ``completion`` (the final message fills the rest)."""
        ...

    def models(self) -> list[str]: ...

    def adapters(self) -> dict[str, Any]: ...

    def load_adapter(self, name: str, pinned: bool | None = None, reload: bool = False) -> dict[str, Any]: ...

    def unload_adapter(self, name: str) -> dict[str, Any]: ...


class GrpcClient:
    def __init__(self, target: str, token: str | None = None, timeout_s: float | None = 600.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def request(self, ask: Ask) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(
            max_tokens=ask.max_tokens, temperature=ask.temperature, seed=ask.seed, stop=ask.stop
        )
        speculative = ask.speculative()
        speculation = pb.Speculation(**speculative) if speculative else None
        if ask.messages is not None:
            chat = pb.Chat(messages=[pb.ChatMessage(role=r, content=c) for r, c in ask.messages])
            return pb.GenerateRequest(model=ask.model, chat=chat, sampling=sampling, speculation=speculation)
        return pb.GenerateRequest(model=ask.model, prompt=ask.prompt or "", sampling=sampling, speculation=speculation)

    def stream(self, ask: Ask, completion: Completion) -> Iterator[str]:
        try:
            for message in self.stub.Generate(self.request(ask), timeout=self.timeout_s):
                if message.HasField("chunk"):
                    completion.text += message.chunk.text
                    completion.token_ids += list(message.chunk.token_ids)
                    yield message.chunk.text
                else:
                    final = message.final
                    completion.finish_reason = final.finish_reason
                    completion.prompt_tokens = final.usage.prompt_tokens
                    completion.completion_tokens = final.usage.completion_tokens
                    completion.cached = final.cached
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None

    def models(self) -> list[str]:
        return [m.id for m in self._call(self.stub.ListModels, pb.ListModelsRequest()).models]

    def adapters(self) -> dict[str, Any]:
        reply = self._call(self.stub.ListAdapters, pb.ListAdaptersRequest())
        return {"data": [_adapter(a) for a in reply.adapters], "available": list(reply.available)}

    def load_adapter(self, name: str, pinned: bool | None = None, reload: bool = False) -> dict[str, Any]:
        return _adapter(
            self._call(self.stub.LoadAdapter, pb.LoadAdapterRequest(name=name, pinned=pinned, reload=reload))
        )

    def unload_adapter(self, name: str) -> dict[str, Any]:
        reply = self._call(self.stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name))
        return {"id": reply.name, "status": reply.status, "in_flight": reply.in_flight}

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None


class RestClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float | None = 600.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def body(self, ask: Ask) -> dict[str, Any]:
        body: dict[str, Any] = {"model": ask.model, "stream": True, "stream_options": {"include_usage": True}}
        for name in ("max_tokens", "temperature", "seed"):
            if getattr(ask, name) is not None:
                body[name] = getattr(ask, name)
        if ask.stop:
            body["stop"] = ask.stop
        if speculative := ask.speculative():
            body["speculative"] = speculative
        if ask.messages is not None:
            body["messages"] = [{"role": r, "content": c} for r, c in ask.messages]
        else:
            body["prompt"] = ask.prompt or ""
        return body

    def stream(self, ask: Ask, completion: Completion) -> Iterator[str]:
        route = "/v1/chat/completions" if ask.messages is not None else "/v1/completions"
        with self.http.stream("POST", route, json=self.body(ask)) as response:
            if response.status_code != 200:
                response.read()
                raise _http_error(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise ClientError("stream", event["error"]["message"])
                if event.get("usage"):
                    completion.prompt_tokens = event["usage"]["prompt_tokens"]
                    completion.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") or choice.get("text") or ""
                    completion.finish_reason = choice.get("finish_reason") or completion.finish_reason
                    if text:
                        completion.text += text
                        yield text

    def models(self) -> list[str]:
        return [card["id"] for card in self._json("GET", "/v1/models")["data"]]

    def adapters(self) -> dict[str, Any]:
        return self._json("GET", "/v1/adapters")

    def load_adapter(self, name: str, pinned: bool | None = None, reload: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "reload": reload}
        if pinned is not None:
            body["pinned"] = pinned
        return self._json("POST", "/v1/adapters", json=body)

    def unload_adapter(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/adapters/{name}")

    def _json(self, method: str, route: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, route, **kwargs)
        if response.status_code != 200:
            raise _http_error(response)
        return response.json()  # type: ignore[no-any-return]


def connect(protocol: str, url: str, grpc_target: str, token: str | None = None) -> GrpcClient | RestClient:
    return GrpcClient(grpc_target, token) if protocol == "grpc" else RestClient(url, token)


def _adapter(status: pb.AdapterStatus) -> dict[str, Any]:
    return {
        "id": status.name, "version": status.version, "residency": status.residency, "pinned": status.pinned,
        "rank": status.rank, "in_flight": status.in_flight, "draining": status.draining,
    }  # fmt: skip


def _rpc_error(exc: grpc.RpcError) -> ClientError:
    return ClientError(exc.code().name, exc.details() or "")  # type: ignore[attr-defined]


def _http_error(response: httpx.Response) -> ClientError:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    return ClientError(str(response.status_code), message)
