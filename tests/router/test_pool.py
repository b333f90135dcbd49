"""The replica pool: DNS discovery, readiness and adapter polls, without sockets (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import httpx
import pytest

from ftserve.router import pool as pool_module
from ftserve.router.metrics import RouterMetrics
from ftserve.router.pool import ReplicaPool, resolve_replicas
from ftserve.router.select import Residency
from ftserve.router.settings import RouterConfig

TOKEN = "pool-token"


class FakeFleet:
    """Answers /readyz and /v1/adapters for any replica URL, from per-host tables."""

    def __init__(self) -> None:
        self.ready: dict[str, bool] = {}
        self.adapters: dict[str, Any] = {}  # host -> the JSON body of GET /v1/adapters
        self.auth: list[str | None] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/readyz":
            return httpx.Response(200 if self.ready.get(host, True) else 503)
        self.auth.append(request.headers.get("authorization"))
        return httpx.Response(200, json=self.adapters.get(host, {"object": "list", "data": [], "available": []}))


def _pool(fleet: FakeFleet, token: str | None = TOKEN, **settings: Any) -> tuple[ReplicaPool, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fleet.handler))
    return ReplicaPool(RouterConfig(**settings), client, RouterMetrics(), token), client


def _refresh(pool: ReplicaPool, times: int = 1) -> None:
    async def go() -> None:
        for _ in range(times):
            await pool.refresh()
        await pool.client.aclose()

    asyncio.run(go())


def test_dns_resolution_gives_one_url_per_address() -> None:
    urls = resolve_replicas("localhost", 3000)
    assert "http://127.0.0.1:3000" in urls
    assert all(u.startswith(("http://127.", "http://[::1]")) and u.endswith(":3000") for u in urls)


def test_replicas_join_and_leave_with_the_dns_records_and_survive_a_failed_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[list[str] | OSError] = [
        ["http://10.0.0.1:3000", "http://10.0.0.2:3000"],
        ["http://10.0.0.2:3000", "http://10.0.0.3:3000"],
        socket.gaierror("Name or service not known"),
    ]
    seen: list[list[str]] = []

    def resolve(name: str, port: int) -> list[str]:
        assert (name, port) == ("ftserve-headless", 3000)
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(pool_module, "resolve_replicas", resolve)
    pool, _ = _pool(FakeFleet(), dns_name="ftserve-headless", replicas=["http://static:3000"])

    async def go() -> None:
        for _ in range(3):
            await pool.refresh()
            seen.append(sorted(pool.replicas))
        await pool.client.aclose()

    asyncio.run(go())
    assert seen == [
        ["http://10.0.0.1:3000", "http://10.0.0.2:3000", "http://static:3000"],
        ["http://10.0.0.2:3000", "http://10.0.0.3:3000", "http://static:3000"],
        ["http://10.0.0.2:3000", "http://10.0.0.3:3000", "http://static:3000"],  # last known set kept
    ]
    exposed = pool.metrics.exposition().decode()
    assert 'replica="http://10.0.0.1:3000"' not in exposed  # the series of a replica that left are gone
    assert 'ftserve_router_replica_ready{replica="http://10.0.0.3:3000"} 1.0' in exposed


def test_holdings_come_from_the_admin_api_without_draining_adapters() -> None:
    fleet = FakeFleet()
    fleet.adapters["a"] = {
        "object": "list",
        "data": [
            {"id": "on-gpu", "residency": "device", "draining": False},
            {"id": "in-ram", "residency": "cpu", "draining": False},
            {"id": "leaving", "residency": "device", "draining": True},
        ],
        "available": ["not-loaded"],
    }
    pool, _ = _pool(fleet, replicas=["http://a:3000"])
    _refresh(pool)
    replica = pool.replicas["http://a:3000"]
    assert replica.holdings == {"on-gpu": Residency.DEVICE, "in-ram": Residency.CPU}
    assert pool.knows("not-loaded") and pool.knows("on-gpu") and not pool.knows("made-up")
    assert fleet.auth == [f"Bearer {TOKEN}"]


def test_an_unexpected_admin_body_leaves_the_adapters_unknown_but_the_replica_ready() -> None:
    fleet = FakeFleet()
    fleet.adapters["a"] = {"unexpected": True}
    pool, _ = _pool(fleet, replicas=["http://a:3000"])
    _refresh(pool)
    replica = pool.replicas["http://a:3000"]
    assert replica.ready and replica.holdings == {}
    assert replica.problem is not None and "unexpected" in replica.problem


def test_without_a_token_the_admin_api_is_not_called() -> None:
    fleet = FakeFleet()
    pool, _ = _pool(fleet, token=None, replicas=["http://a:3000"])
    _refresh(pool)
    assert pool.ready_urls() == ["http://a:3000"] and fleet.auth == []


def test_readiness_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    fleet = FakeFleet()
    fleet.ready["a"] = False
    pool, client = _pool(fleet, replicas=["http://a:3000"])
    caplog.set_level(logging.INFO, logger="ftserve.router")

    async def go() -> None:
        for ready in (False, False, False, True, True, True, False, False):
            fleet.ready["a"] = ready
            await pool.refresh()
        await client.aclose()

    asyncio.run(go())
    assert [r.getMessage() for r in caplog.records] == [
        "replica http://a:3000 joined",
        "replica http://a:3000: /readyz answered 503",  # why it is not ready yet
        "replica http://a:3000 is ready",
        "replica http://a:3000 is not ready (/readyz answered 503)",
    ]
