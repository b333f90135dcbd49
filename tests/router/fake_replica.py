"""A fake ftserve replica (its REST surface, as the router uses it) and in-process uvicorn servers on
loopback sockets, for the router's integration tests. The unit under test is the router, not the service."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ftserve.router.app import build_app
from ftserve.router.settings import RouterConfig
from ftserve.service.routes import EventStreamResponse

TOKEN = "router-test-token"
HANG_GUARD_S = 300  # a broken router would hang a test (say, a buffered stream): fail it, generously late


@dataclass
class FakeReplica:
    name: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> residency
    ready: bool = True
    serving: bool = True  # False: generations get 503 (as a replica still loading its model)
    chunks: int = 3
    gates: list[asyncio.Event] = field(default_factory=list)  # chunk i is sent once gates[i] is set
    generations: list[dict[str, Any]] = field(default_factory=list)  # bodies of the generations it got
    admin_calls: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Authorization
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # a stream's client went away

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/readyz", self._readyz, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/adapters", self._list, methods=["GET"]),
                Route("/v1/adapters", self._load, methods=["POST"]),
                Route("/v1/adapters/{name:path}", self._unload, methods=["DELETE"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )

    async def _readyz(self, request: Request) -> Response:
        return PlainTextResponse("ok" if self.ready else "loading", status_code=200 if self.ready else 503)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [], "replica": self.name})

    def _authorized(self, request: Request) -> bool:
        self.admin_calls.append((request.method, request.url.path, request.headers.get("authorization")))
        return request.headers.get("authorization") == f"Bearer {TOKEN}"

    async def _list(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": {"message": "wrong token"}}, status_code=401)
        data = [{"id": n, "object": "adapter", "residency": r, "draining": False} for n, r in self.adapters.items()]
        return JSONResponse({"object": "list", "data": data, "available": ["on-disk-only"]})

    async def _load(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": {"message": "wrong token"}}, status_code=401)
        name = (await request.json())["name"]
        self.adapters[name] = "device"
        return JSONResponse({"id": name, "object": "adapter", "residency": "device"})

    async def _unload(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not self._authorized(request) or name not in self.adapters:
            return JSONResponse({"error": {"message": f"adapter {name!r} is not loaded"}}, status_code=404)
        del self.adapters[name]
        return JSONResponse({"id": name, "object": "adapter", "status": "unloaded", "in_flight": 0})

    async def _chat(self, request: Request) -> Response:
        if not self.serving:
            return JSONResponse({"error": {"message": "the model is still loading"}}, status_code=503)
        body = await request.json()
        self.generations.append(body)
        if not body.get("stream"):
            return JSONResponse({"object": "chat.completion", "replica": self.name, "model": body["model"]})

        async def events() -> AsyncIterator[str]:
            try:
                for i in range(self.chunks):
                    if i < len(self.gates):
                        await self.gates[i].wait()
                    yield f"data: {json.dumps({'replica': self.name, 'i': i})}\n\n"
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.disconnected.set()
                raise

        return EventStreamResponse(events(), media_type="text/event-stream")


class Served:
    """``app`` served by uvicorn in this event loop on a loopback socket that listens from construction on
    (connections queue until the server runs, so nothing waits for it to start)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        """Shut down and close the socket: new connections are refused from then on."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
        self.sock.close()


@dataclass
class Cluster:
    router: Served
    replicas: dict[str, Served]  # fake name -> its server

    @property
    def router_url(self) -> str:
        return self.router.url

    def url(self, name: str) -> str:
        return self.replicas[name].url

    async def refresh(self) -> None:
        await self.router.app.state.router.refresh()


@asynccontextmanager
async def cluster(*fakes: FakeReplica, token: str | None = TOKEN, **settings: Any) -> AsyncIterator[Cluster]:
    """The fakes and a router in front of them (no timed refreshes: tests call ``refresh()``)."""
    replicas = {fake.name: Served(fake.app()) for fake in fakes}
    config = RouterConfig(replicas=[s.url for s in replicas.values()], refresh_s=3600, **settings)
    router = Served(build_app(config, token))
    for served in [*replicas.values(), router]:
        served.start()
    try:
        # Answered only once the router's startup (its first refresh of the replicas) is complete.
        async with httpx.AsyncClient() as client:
            (await client.get(f"{router.url}/healthz")).raise_for_status()
        yield Cluster(router, replicas)
    finally:
        for served in [router, *replicas.values()]:
            await served.stop()


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, HANG_GUARD_S))
