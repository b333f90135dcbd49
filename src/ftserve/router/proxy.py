"""Forwarding one request to the first replica of a plan that takes it, and streaming its answer back.

A replica is skipped (and the next one tried) only when nothing can have happened there: the connection
failed, or it answered 503 before reading the request (still loading). Anything else — including a read
timeout after the request was sent — is the replica's answer, passed through: a generation is not
idempotent, so it is never sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ftserve.router.pool import Replica, ReplicaPool
from ftserve.router.select import Choice
from ftserve.service import errors

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-ftserve-replica"
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers"}
    | {"transfer-encoding", "upgrade", "host", "content-length"}
)


def request_headers(request: Request) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, with the client's address added to ``x-forwarded-for``."""
    skip = _HOP | {"x-forwarded-for"}
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in skip]
    chain = [v for k, v in request.headers.items() if k.lower() == "x-forwarded-for"]
    if request.client is not None:
        chain.append(request.client.host)
    if chain:
        headers.append(("x-forwarded-for", ", ".join(chain)))
    return headers


def response_headers(upstream: httpx.Response, replica_url: str) -> list[tuple[bytes, bytes]]:
    """The replica's headers as sent (the body is passed through raw, so its length and encoding stay true),
    minus hop-by-hop ones and those uvicorn writes itself (``date``, ``server``), plus which replica answered."""
    hop = (_HOP - {"content-length"}) | {"date", "server"}
    raw = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower().decode("latin-1") not in hop]
    return [*raw, (REPLICA_HEADER.encode(), replica_url.encode("latin-1"))]


class UpstreamResponse(Response):
    """A replica's response, relayed chunk by chunk as it arrives (SSE included).

    Like ``ftserve.service.routes.EventStreamResponse``, it watches ``receive`` for the client going away
    (uvicorn's ``send`` does not fail for a closed connection) and then closes the upstream stream, which the
    replica sees as a disconnect and cancels the generation. ``on_done`` gets the outcome exactly once:
    ``done``, ``disconnected`` (the client left first) or ``upstream_error`` (the replica broke off).
    """

    def __init__(self, upstream: httpx.Response, replica_url: str, on_done: Callable[[str], None]) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.raw_headers = response_headers(upstream, replica_url)
        self.background = None
        self._on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "disconnected"
        try:
            async with anyio.create_task_group() as group:

                async def relay() -> None:
                    nonlocal outcome
                    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                    try:
                        async for chunk in self.upstream.aiter_raw():
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except httpx.HTTPError as exc:
                        # Headers are out: the only honest signal left is an incomplete body (uvicorn closes
                        # the connection when the app returns without finishing the response).
                        log.warning("replica %s broke off a response: %s", self.upstream.url, exc)
                        outcome = "upstream_error"
                    else:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        outcome = "done"
                    group.cancel_scope.cancel()

                group.start_soon(relay)
                await _until_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()
            self._on_done(outcome)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def forward(
    pool: ReplicaPool,
    request: Request,
    body: bytes,
    plan: Iterable[Choice],
    on_answer: Callable[[Replica, int | None], None],
) -> Response:
    """Send the request to the first replica of ``plan`` that takes it.

    ``on_answer(replica, status)`` runs once, when that replica's status line is in (before the client sees
    any of it); ``status`` is None when the request was sent but no answer came (then a 502 is raised). A
    stream that ends early is counted in ``ftserve_router_aborted_streams_total``. Raises a 503 APIError
    when no replica took the request.
    """
    url_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = request_headers(request)
    tried: list[str] = []
    for choice in plan:
        replica = pool.acquire(choice.url)
        if replica is None:
            continue
        upstream_request = pool.client.build_request(
            request.method, choice.url + url_path, headers=headers, content=body
        )
        try:
            upstream = await pool.client.send(upstream_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            pool.release(replica)
            pool.mark_unreachable(choice.url, f"connect failed: {type(exc).__name__}")
            pool.metrics.failovers.labels(choice.url, "connect").inc()
            tried.append(choice.url)
            continue
        except httpx.HTTPError as exc:  # sent, then no answer: not retried (it may be generating)
            pool.release(replica)
            on_answer(replica, None)
            raise errors.APIError(
                502, f"replica {choice.url} did not answer: {type(exc).__name__}", "server_error", None, "bad_gateway"
            ) from None
        except BaseException:  # cancelled (shutdown) while waiting: keep the in-flight count true
            pool.release(replica)
            raise
        if upstream.status_code == 503:  # not serving yet: it did not take the request
            await upstream.aclose()
            pool.release(replica)
            pool.metrics.failovers.labels(choice.url, "unavailable").inc()
            tried.append(choice.url)
            continue
        on_answer(replica, upstream.status_code)

        def done(outcome: str, replica: Replica = replica) -> None:
            pool.release(replica)
            if outcome != "done":
                pool.metrics.aborted.labels(replica.url, outcome).inc()

        return UpstreamResponse(upstream, choice.url, done)
    raise errors.unavailable(
        f"no replica took the request (tried {', '.join(tried)})" if tried else "no replica is ready"
    )
