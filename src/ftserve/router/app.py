"""The router's HTTP app (Starlette) and its uvicorn server.

Routes: generations (``POST /v1/chat/completions``, ``/v1/completions``) go where :mod:`.select` says;
adapter admin writes (``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``) fan out to every ready replica;
every other path goes to the least busy ready replica. The router's own endpoints are ``/healthz``,
``/readyz`` (200 while at least one replica is ready), ``/metrics`` and ``/router/replicas`` (what it
knows about each replica, as JSON).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ftserve.router.metrics import NO_MODEL, OTHER, RouterMetrics, outcome_of
from ftserve.router.pool import Replica, ReplicaPool
from ftserve.router.proxy import forward, request_headers
from ftserve.router.select import NoReadyReplicaError
from ftserve.router.settings import RouterConfig
from ftserve.service import errors

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """What the routes share: settings, the replica pool, the upstream HTTP client and the metrics."""

    def __init__(self, config: RouterConfig, token: str | None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
        # No connection cap: every in-flight stream holds one, and the replicas' queues do the limiting.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self.pool = ReplicaPool(config, self.client, self.metrics, token)

    async def refresh(self) -> None:
        """Poll every replica now (discovery, readiness, adapters)."""
        await self.pool.refresh()

    def adapter_label(self, model: str | None, status: int | None) -> str:
        if model is None:
            return NO_MODEL
        return model if (status is not None and status < 400) or self.pool.knows(model) else OTHER


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = errors.payload_too_large(f"request body exceeds the limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def requested_model(body: bytes) -> str | None:
    """The JSON body's ``model``; None when absent or not a string (the replica then says what is wrong)."""
    model = errors.json_object(body).get("model")
    return model if isinstance(model, str) else None


def _router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


async def _proxy(request: Request, model: str | None, body: bytes) -> Response:
    router = _router(request)
    try:
        plan = router.pool.plan(model)
    except NoReadyReplicaError:
        router.metrics.requests.labels(router.adapter_label(model, None), "", "unavailable").inc()
        raise errors.unavailable("no replica is ready") from None
    holders = {c.url for c in plan if c.residency is not None}

    def answered(replica: Replica, status: int | None) -> None:
        label = router.adapter_label(model, status)
        outcome = "upstream_error" if status is None else outcome_of(status)
        router.metrics.requests.labels(label, replica.url, outcome).inc()
        if model is not None and replica.url in holders:
            router.metrics.affinity_hits.labels(label).inc()

    try:
        return await forward(router.pool, request, body, plan, answered)
    except errors.APIError as err:
        if err.status == 503:
            router.metrics.requests.labels(router.adapter_label(model, None), "", "unavailable").inc()
        raise


async def generate(request: Request) -> Response:
    body = await read_body(request, _router(request).config.max_body_bytes)
    try:
        model = requested_model(body)
    except errors.APIError:
        _router(request).metrics.requests.labels(NO_MODEL, "", "bad_request").inc()
        raise
    return await _proxy(request, model, body)


async def any_replica(request: Request) -> Response:
    return await _proxy(request, None, await read_body(request, _router(request).config.max_body_bytes))


async def fan_out(request: Request) -> Response:
    """An adapter admin write, applied on every ready replica: each holds its own adapters, so a load or an
    unload sent to one replica only would leave the others (and the router's affinity) out of step."""
    router = _router(request)
    body = await read_body(request, router.config.max_body_bytes)
    urls = router.pool.ready_urls()
    if not urls:
        raise errors.unavailable("no replica is ready")
    headers = request_headers(request)

    async def one(url: str) -> dict[str, Any]:
        try:
            res = await router.client.request(request.method, url + request.url.path, headers=headers, content=body)
        except httpx.HTTPError as exc:
            return {"replica": url, "status": None, "body": None, "error": f"{type(exc).__name__}: {exc}"}
        try:
            payload: Any = res.json()
        except ValueError:
            payload = res.text
        return {"replica": url, "status": res.status_code, "body": payload}

    results = await asyncio.gather(*(one(url) for url in urls))
    await router.refresh()  # the replicas' adapters changed: route by what they hold now
    return JSONResponse(*_combined(results))


def _combined(results: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """200 when every replica succeeded; else their common status if they agree (say 401 or 404), else 502;
    an error body (OpenAI's shape) names how many failed and the first one's reason."""
    content: dict[str, Any] = {"object": "fanout", "replicas": results}
    failed = [r for r in results if r["status"] is None or r["status"] >= 300]
    if not failed:
        return content, 200
    statuses = {r["status"] for r in results}
    status = statuses.pop() if len(statuses) == 1 and None not in statuses else 502
    first = failed[0]
    reason = first.get("error") or _message(first["body"]) or f"status {first['status']}"
    message = f"{len(failed)} of {len(results)} replicas failed; {first['replica']}: {reason}"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {**content, **errors.APIError(status, message, kind, None, "fanout_failed").body()}, status


def _message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return None


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    ready = len(_router(request).pool.ready_urls())
    if ready:
        return PlainTextResponse(f"ok: {ready} replica(s) ready")
    return JSONResponse(errors.unavailable("no replica is ready").body(), status_code=503)


async def metrics(request: Request) -> Response:
    return Response(_router(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def replicas(request: Request) -> Response:
    return JSONResponse({"replicas": _router(request).pool.status()})


def _guarded(handler: Handler) -> Handler:
    """Every failure becomes an OpenAI error body; unexpected ones are logged, never shown."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except errors.APIError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            err = errors.internal()
            return JSONResponse(err.body(), status_code=err.status)

    return endpoint


def build_app(config: RouterConfig, token: str | None) -> Starlette:
    """The router app; ``app.state.router`` is its :class:`Router` (tests call its ``refresh()``)."""
    router = Router(config, token)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await router.refresh()  # know the replicas before the first request
        except Exception:
            log.exception("first replica refresh failed; retrying every %gs", config.refresh_s)
        poller = asyncio.create_task(router.pool.run())
        try:
            yield
        finally:
            poller.cancel()
            with suppress(asyncio.CancelledError):
                await poller
            await router.client.aclose()

    every = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/router/replicas", replicas, methods=["GET"]),
        Route("/v1/chat/completions", _guarded(generate), methods=["POST"]),
        Route("/v1/completions", _guarded(generate), methods=["POST"]),
        Route("/v1/adapters", _guarded(fan_out), methods=["POST"]),
        Route("/v1/adapters/{name:path}", _guarded(fan_out), methods=["DELETE"]),
        Route("/{path:path}", _guarded(any_replica), methods=every),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.router = router
    return app


async def serve(config: RouterConfig) -> None:
    """Run the router until interrupted (uvicorn handles SIGINT / SIGTERM)."""
    token = os.environ.get(config.admin_token_env) or None
    if token is None:
        log.warning(
            "$%s is not set: the router cannot read which adapters each replica holds and routes by hash and load only",
            config.admin_token_env,
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per poll of every replica
    app = build_app(config, token)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info"))
    await server.serve()
