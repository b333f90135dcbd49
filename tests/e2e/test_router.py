"""End to end: ``ftserve.router`` in front of one real ``bentoml serve`` replica (the session's server)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ftserve.router.app import build_app
from ftserve.router.proxy import REPLICA_HEADER
from ftserve.router.settings import RouterConfig
from tests.e2e.conftest import Server
from tests.router.fake_replica import Served

pytestmark = pytest.mark.e2e
SHIPPED = "support-router"  # preloaded by the default deployment: the replica holds it from the start
TICKET = [{"role": "user", "content": 'Route support ticket #42 from Ana: "my parcel arrived damaged"'}]


def test_a_real_replica_streams_a_chat_completion_through_the_router(server: Server) -> None:
    async def scenario() -> None:
        app = build_app(RouterConfig(replicas=[server.url], refresh_s=3600), server.token)
        router = Served(app)
        router.start()
        try:
            async with httpx.AsyncClient(timeout=120) as client:
                # Answered once the router's first refresh (readiness + the admin adapter list) is done.
                assert (await client.get(f"{router.url}/readyz")).status_code == 200
                (replica,) = app.state.router.pool.replicas.values()
                assert SHIPPED in replica.holdings  # read from the real admin API with the real token

                body = {"model": SHIPPED, "messages": TICKET, "temperature": 0, "max_tokens": 12}
                async with client.stream(
                    "POST", f"{router.url}/v1/chat/completions", json={**body, "stream": True}
                ) as res:
                    assert res.status_code == 200 and res.headers[REPLICA_HEADER] == server.url
                    assert res.headers["content-type"].startswith("text/event-stream")
                    events = [line[6:] async for line in res.aiter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]" and len(events) > 2
                chunks = [json.loads(e) for e in events[:-1]]
                assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                # The same request straight to the replica (greedy): the router changed nothing in between.
                direct = (await client.post(f"{server.url}/v1/chat/completions", json=body)).json()
                assert text == direct["choices"][0]["message"]["content"]

                metrics = (await client.get(f"{router.url}/metrics")).text
                assert f'ftserve_router_affinity_hits_total{{adapter="{SHIPPED}"}} 1.0' in metrics
        finally:
            await router.stop()

    asyncio.run(asyncio.wait_for(scenario(), 180))
