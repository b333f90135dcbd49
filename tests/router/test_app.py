"""The router over real loopback sockets, in front of two fake replicas served by uvicorn in-process."""

from __future__ import annotations

import asyncio
import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ftserve.router.proxy import REPLICA_HEADER
from ftserve.router.select import rendezvous_score
from tests.router.fake_replica import TOKEN as FAKE_TOKEN
from tests.router.fake_replica import Cluster, FakeReplica, cluster, run

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _preferring(first: str, second: str) -> str:
    """An adapter name that hashing alone would send to ``first`` rather than ``second``."""
    return next(
        name
        for name in (f"lora-{i}" for i in range(100))
        if rendezvous_score(name, first) > rendezvous_score(name, second)
    )


async def _chat(client: httpx.AsyncClient, c: Cluster, model: str, **extra: object) -> httpx.Response:
    return await client.post(f"{c.router_url}/v1/chat/completions", json={"model": model, **CHAT, **extra})


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            name = _preferring(c.url("a"), c.url("b"))  # hashing alone would pick a
            b.adapters[name] = "cpu"
            await c.refresh()
            for _ in range(4):
                res = await _chat(client, c, name)
                assert res.status_code == 200
                assert res.headers[REPLICA_HEADER] == c.url("b")
                assert res.json()["replica"] == "b"
            assert len(b.generations) == 4 and not a.generations

    run(scenario())


def test_a_stream_is_relayed_chunk_by_chunk_in_order() -> None:
    # Chunk i+1 is produced only after the client has received chunk i through the router: a router that
    # buffered the response would never deliver chunk 0, and the test would fail on its hang guard.
    gates = [asyncio.Event() for _ in range(4)]
    a = FakeReplica("a", chunks=4, gates=gates)

    async def scenario() -> None:
        async with cluster(a) as c, httpx.AsyncClient() as client:
            gates[0].set()
            received = []
            body = {"model": "lora-s", "stream": True, **CHAT}
            async with client.stream("POST", f"{c.router_url}/v1/chat/completions", json=body) as res:
                assert res.status_code == 200
                assert res.headers["content-type"].startswith("text/event-stream")
                assert res.headers[REPLICA_HEADER] == c.url("a")
                async for line in res.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    received.append(line.removeprefix("data: "))
                    if received[-1] != "[DONE]":
                        i = json.loads(received[-1])["i"]
                        if i + 1 < len(gates):
                            gates[i + 1].set()
            assert [json.loads(r)["i"] for r in received[:-1]] == [0, 1, 2, 3]
            assert received[-1] == "[DONE]"

    run(scenario())


def test_a_replica_that_goes_not_ready_gets_no_traffic_after_the_next_refresh() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            name = _preferring(c.url("a"), c.url("b"))
            assert (await _chat(client, c, name)).headers[REPLICA_HEADER] == c.url("a")
            a.ready = False
            # Until the router polls, it does not know (so the refresh below is what changes the route).
            assert (await _chat(client, c, name)).headers[REPLICA_HEADER] == c.url("a")
            await c.refresh()
            for _ in range(3):
                assert (await _chat(client, c, name)).headers[REPLICA_HEADER] == c.url("b")
            assert (await client.get(f"{c.router_url}/readyz")).status_code == 200
            a.ready = True
            await c.refresh()
            assert (await _chat(client, c, name)).headers[REPLICA_HEADER] == c.url("a")

    run(scenario())


def test_no_ready_replica_gives_a_503_with_an_openai_error_body() -> None:
    a, b = FakeReplica("a", ready=False), FakeReplica("b", ready=False)

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            res = await _chat(client, c, "lora-x")
            assert res.status_code == 503
            error = res.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert "no replica is ready" in error["message"]
            assert (await client.get(f"{c.router_url}/readyz")).status_code == 503
            assert (await client.get(f"{c.router_url}/v1/models")).status_code == 503
            assert not a.generations and not b.generations

    run(scenario())


def test_a_body_that_is_not_json_gets_a_400_and_a_huge_one_a_413_and_neither_is_forwarded() -> None:
    a = FakeReplica("a")

    async def scenario() -> None:
        async with cluster(a, max_body_bytes=2048) as c, httpx.AsyncClient() as client:
            url = f"{c.router_url}/v1/chat/completions"
            res = await client.post(url, content=b'{"model": "lora-x", ')
            assert res.status_code == 400
            assert res.json()["error"]["type"] == "invalid_request_error"
            assert "not valid JSON" in res.json()["error"]["message"]
            assert (await client.post(url, content=b"[1, 2]")).status_code == 400
            huge = json.dumps({"model": "lora-x", "messages": [{"role": "user", "content": "x" * 4000}]})
            res = await client.post(url, content=huge.encode())
            assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"
            assert not a.generations
            # Valid JSON without a model is the replica's to judge: it is forwarded.
            assert (await client.post(url, json={"messages": []})).headers[REPLICA_HEADER] == c.url("a")

    run(scenario())


def test_a_replica_that_cannot_be_reached_is_skipped_for_the_next() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            name = _preferring(c.url("b"), c.url("a"))
            await c.replicas["b"].stop()  # between two polls: the router still counts b as ready
            res = await _chat(client, c, name)
            assert res.status_code == 200 and res.headers[REPLICA_HEADER] == c.url("a")
            router = c.router.app.state.router
            assert router.pool.ready_urls() == [c.url("a")]  # marked down at once, not at the next poll
            metrics = _samples((await client.get(f"{c.router_url}/metrics")).text)
            assert metrics[("ftserve_router_failovers_total", (("reason", "connect"), ("replica", c.url("b"))))] == 1
            await c.replicas["a"].stop()
            res = await _chat(client, c, name)
            assert res.status_code == 503 and "no replica" in res.json()["error"]["message"]

    run(scenario())


def test_a_replica_answering_503_is_skipped_for_the_next() -> None:
    a, b = FakeReplica("a", serving=False), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            name = _preferring(c.url("a"), c.url("b"))
            res = await _chat(client, c, name)
            assert res.status_code == 200 and res.headers[REPLICA_HEADER] == c.url("b")
            b.serving = False
            res = await _chat(client, c, name)
            assert res.status_code == 503 and res.json()["error"]["code"] == "not_ready"

    run(scenario())


def test_a_client_that_disconnects_closes_the_replica_stream() -> None:
    gates = [asyncio.Event(), asyncio.Event()]  # chunk 1 never comes: the stream stays open
    a = FakeReplica("a", chunks=2, gates=gates)

    async def scenario() -> None:
        async with cluster(a) as c, httpx.AsyncClient() as client:
            gates[0].set()
            body = {"model": "lora-s", "stream": True, **CHAT}
            async with client.stream("POST", f"{c.router_url}/v1/chat/completions", json=body) as res:
                async for line in res.aiter_lines():
                    if line.startswith("data: "):
                        break  # got chunk 0; leaving the block closes the connection
            await a.disconnected.wait()  # the replica saw its client (the router) go away

    run(scenario())


def test_metrics_count_requests_by_outcome_and_affinity_hits() -> None:
    a, b = FakeReplica("a"), FakeReplica("b", adapters={"lora-b": "device"})

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            for _ in range(2):
                await _chat(client, c, "lora-b")
            await _chat(client, c, "random-name-nobody-has", stream=False)
            await client.post(f"{c.router_url}/v1/chat/completions", content=b"{oops")
            text = (await client.get(f"{c.router_url}/metrics")).text
            m = _samples(text)
            b_url = c.url("b")
            ok_b = ("ftserve_router_requests_total", (("adapter", "lora-b"), ("outcome", "ok"), ("replica", b_url)))
            assert m[ok_b] == 2
            assert m[("ftserve_router_affinity_hits_total", (("adapter", "lora-b"),))] == 2
            assert (
                m[("ftserve_router_requests_total", (("adapter", "none"), ("outcome", "bad_request"), ("replica", "")))]
                == 1
            )
            assert m[("ftserve_router_replica_ready", (("replica", b_url),))] == 1
            assert m[("ftserve_router_replica_adapters", (("replica", b_url), ("residency", "device")))] == 1
            assert m[("ftserve_router_in_flight_requests", (("replica", b_url),))] == 0
            # the fake answers any name with 200, so that name is counted as itself; a 4xx would be "other"
            assert "random-name-nobody-has" in text

    run(scenario())


def test_adapter_admin_writes_fan_out_to_every_ready_replica() -> None:
    a, b = FakeReplica("a"), FakeReplica("b", adapters={"only-on-b": "cpu"})
    auth = {"Authorization": f"Bearer {FAKE_TOKEN}"}

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            res = await client.post(f"{c.router_url}/v1/adapters", json={"name": "lora-new"}, headers=auth)
            assert res.status_code == 200
            assert {r["replica"]: r["status"] for r in res.json()["replicas"]} == {c.url("a"): 200, c.url("b"): 200}
            assert ("POST", "/v1/adapters", auth["Authorization"]) in a.admin_calls
            assert ("POST", "/v1/adapters", auth["Authorization"]) in b.admin_calls
            # the router refreshed after the write: both now count as holders
            views = {r.url: r for r in c.router.app.state.router.pool.replicas.values()}
            assert all("lora-new" in views[c.url(n)].holdings for n in ("a", "b"))
            # only b has this one: a refuses (404), b unloads -> a combined 502 naming the failure
            res = await client.delete(f"{c.router_url}/v1/adapters/only-on-b", headers=auth)
            assert res.status_code == 502
            assert res.json()["error"]["message"].startswith(f"1 of 2 replicas failed; {c.url('a')}")
            assert "only-on-b" not in b.adapters
            # every replica refusing the same way keeps that status (a wrong token: 401)
            res = await client.post(f"{c.router_url}/v1/adapters", json={"name": "x"}, headers={"Authorization": "no"})
            assert res.status_code == 401 and res.json()["error"]["code"] == "fanout_failed"

    run(scenario())


def test_other_paths_go_to_a_ready_replica() -> None:
    a, b = FakeReplica("a", ready=False), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b) as c, httpx.AsyncClient() as client:
            res = await client.get(f"{c.router_url}/v1/models")
            assert res.status_code == 200 and res.json()["replica"] == "b"
            assert res.headers[REPLICA_HEADER] == c.url("b")
            listing = (await client.get(f"{c.router_url}/router/replicas")).json()["replicas"]
            assert {r["url"]: r["ready"] for r in listing} == {c.url("a"): False, c.url("b"): True}

    run(scenario())


def test_without_the_admin_token_no_replica_counts_as_a_holder() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")

    async def scenario() -> None:
        async with cluster(a, b, token=None) as c, httpx.AsyncClient() as client:
            name = _preferring(c.url("a"), c.url("b"))
            b.adapters[name] = "device"  # invisible without the token: hashing decides
            await c.refresh()
            assert (await _chat(client, c, name)).headers[REPLICA_HEADER] == c.url("a")
            assert not a.admin_calls and not b.admin_calls

    run(scenario())


def test_a_wrong_admin_token_leaves_the_replica_ready_but_its_adapters_unknown() -> None:
    a = FakeReplica("a", adapters={"lora-a": "device"})

    async def scenario() -> None:
        async with cluster(a, token="wrong") as c:
            (replica,) = c.router.app.state.router.pool.replicas.values()
            assert replica.ready and replica.holdings == {}
            assert replica.problem is not None and "401" in replica.problem

    run(scenario())
