"""gRPC and REST over one real engine: streaming, status codes, deadlines, cancellation, the response cache,
adapter admin and unloading with requests in flight."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from ftserve.bench.adapters import make_random_adapters
from ftserve.engine.model import NativeLlama
from ftserve.v1 import ftserve_pb2 as pb
from tests.service.stack import AUTH, TOKEN, Stack, prompt_request, serving_stack

PROMPT = "The three most important things about customer support are"


@pytest.fixture(scope="module")
def model(model_dir: Path) -> NativeLlama:
    return NativeLlama.from_dir(model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    make_random_adapters(model_dir, folder, ["ad-a", "ad-b"], seed=5)
    return folder


def run(model: NativeLlama, model_dir: Path, adapter_dir: Path, scenario: Any, **options: Any) -> None:
    async def go() -> None:
        async with serving_stack(model, model_dir, adapter_dir, **options) as stack:
            await scenario(stack)

    asyncio.run(go())


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def rest_text(stack: Stack, model: str, max_tokens: int = 12, **extra: Any) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    response = await stack.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_grpc_streams_what_rest_returns_for_an_adapter(model: NativeLlama, model_dir: Path, adapter_dir: Path) -> None:
    async def scenario(stack: Stack) -> None:
        want = await rest_text(stack, "ad-a")
        text, final, chunks = await stack.grpc_text(prompt_request("ad-a", PROMPT))
        assert text == want and chunks > 1
        assert final.finish_reason == "length" and final.usage.completion_tokens == 12 and not final.cached
        assert final.usage.total_tokens == final.usage.prompt_tokens + 12
        base_text, _, _ = await stack.grpc_text(prompt_request(stack.base, PROMPT))
        assert base_text != text  # the adapter really routes
        assert len(stack.generate_calls) == 3

    run(model, model_dir, adapter_dir, scenario, cache=False)


def test_cache_hit_returns_identical_text_without_touching_the_engine(
    model: NativeLlama, model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "adapters"
    shutil.copytree(adapter_dir, folder)

    async def scenario(stack: Stack) -> None:
        hits = {"adapter": "ad-a", "protocol": "grpc"}
        hits_before = sample("ftserve_response_cache_hits_total", hits)
        first = await rest_text(stack, "ad-a")
        assert len(stack.generate_calls) == 1
        text, final, chunks = await stack.grpc_text(prompt_request("ad-a", PROMPT))
        assert (text, final.cached, len(stack.generate_calls)) == (first, True, 1)
        assert chunks > 1  # a hit still streams
        assert sample("ftserve_response_cache_hits_total", hits) == hits_before + 1
        streamed = await stack.http.post(
            "/v1/completions",
            json={"model": "ad-a", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "stream": True},
        )
        frames = [f for f in streamed.text.split("\n\n") if f.startswith("data: {")]
        assert len(frames) > 2 and len(stack.generate_calls) == 1
        # Sampling without a seed is not deterministic: never cached.
        for _ in range(2):
            await stack.grpc_text(prompt_request("ad-a", PROMPT, temperature=0.9))
        assert len(stack.generate_calls) == 3
        # New weights under the same name: a new version, so the old entry must not answer.
        make_random_adapters(model_dir, folder, ["ad-a"], seed=99)
        reloaded = await stack.http.post(
            "/v1/adapters", json={"name": "ad-a", "reload": True}, headers={"authorization": f"Bearer {TOKEN}"}
        )
        assert reloaded.status_code == 200, reloaded.text
        text, final, _ = await stack.grpc_text(prompt_request("ad-a", PROMPT))
        assert not final.cached and len(stack.generate_calls) == 4
        assert text != first
        assert sample("ftserve_cost_usd_total", {"adapter": "ad-a"}) > 0

    run(model, model_dir, folder, scenario)


def test_bad_grpc_requests_get_status_codes_and_no_traceback(
    model: NativeLlama, model_dir: Path, adapter_dir: Path
) -> None:
    cases = [
        (prompt_request("no-such-adapter", PROMPT), grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
        (prompt_request("ad-a", PROMPT, temperature=3.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (prompt_request("ad-a", PROMPT, max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (pb.GenerateRequest(model="ad-a"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.GenerateRequest(model="ad-a", chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="x")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
    ]

    async def scenario(stack: Stack) -> None:
        for request, code, needle in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stack.grpc_text(request)
            assert err.value.code() == code, err.value
            assert needle in (err.value.details() or "") and "Traceback" not in (err.value.details() or "")
        assert stack.generate_calls == []  # refused before the engine
        text, _, _ = await stack.grpc_text(prompt_request("ad-a", PROMPT))  # and the service still works
        assert text

    run(model, model_dir, adapter_dir, scenario)


def long_request(model: str) -> pb.GenerateRequest:
    return prompt_request(model, PROMPT, max_tokens=200, ignore_eos=True)


def test_deadline_and_cancellation_stop_generation(model: NativeLlama, model_dir: Path, adapter_dir: Path) -> None:
    aborted = {"adapter": "ad-a", "protocol": "grpc", "finished_reason": "abort"}

    async def scenario(stack: Stack) -> None:
        before = sample("ftserve_request_success_total", aborted)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.grpc_text(long_request("ad-a"), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await stack.idle()
        call = stack.stub.Generate(long_request("ad-a"))
        seen = 0
        async for message in call:
            seen += message.HasField("chunk")
            if seen == 2:
                call.cancel()
                break
        await stack.idle()
        assert sample("ftserve_request_success_total", aborted) == before + 2
        generated = sample("ftserve_generation_tokens_total", {"adapter": "ad-a", "protocol": "grpc"})
        assert generated < 400  # neither ran to its 200 tokens

    run(model, model_dir, adapter_dir, scenario, cache=False)


def test_a_full_queue_is_resource_exhausted(model: NativeLlama, model_dir: Path, adapter_dir: Path) -> None:
    async def scenario(stack: Stack) -> None:
        running = stack.stub.Generate(long_request(stack.base))
        await anext(aiter(running))  # it is running: the one slot is taken
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.grpc_text(prompt_request(stack.base, "Hello"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        await stack.idle()

    run(model, model_dir, adapter_dir, scenario, cache=False, max_num_seqs=1, max_queue=0)


@pytest.mark.parametrize("name", ["../ad-a", "/etc/passwd", "a/b", ".."])
def test_admin_refuses_paths_and_missing_tokens_over_both_protocols(
    name: str, model: NativeLlama, model_dir: Path, adapter_dir: Path
) -> None:
    async def scenario(stack: Stack) -> None:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stack.stub.LoadAdapter(pb.LoadAdapterRequest(name="ad-a"), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stack.http.get("/v1/adapters")).status_code == 401
        assert (await stack.http.get("/v1/adapters", headers={"authorization": "Bearer x"})).status_code == 401
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.LoadAdapter(pb.LoadAdapterRequest(name=name), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        headers = {"authorization": f"Bearer {TOKEN}"}
        response = await stack.http.post("/v1/adapters", json={"name": name}, headers=headers)
        assert response.status_code == 400 and "no paths" in response.json()["error"]["message"]
        if ".." not in name:  # clients resolve ".." segments away before sending
            response = await stack.http.delete(f"/v1/adapters/{name}", headers=headers)
            assert response.status_code == 400 and "no paths" in response.text
        assert stack.engine.adapter_info() == []  # nothing was loaded

    run(model, model_dir, adapter_dir, scenario)


def test_admin_loads_pins_lists_and_unloads(model: NativeLlama, model_dir: Path, adapter_dir: Path) -> None:
    async def scenario(stack: Stack) -> None:
        status = await stack.stub.LoadAdapter(pb.LoadAdapterRequest(name="ad-b", pinned=True), metadata=AUTH)
        assert status.name == "ad-b" and status.pinned and len(status.version) == 16
        listing = await stack.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=AUTH)
        assert [a.name for a in listing.adapters] == ["ad-b"] and list(listing.available) == ["ad-a"]
        models = await stack.stub.ListModels(pb.ListModelsRequest())
        assert {m.id for m in models.models} == {stack.base, "ad-a", "ad-b"}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.LoadAdapter(pb.LoadAdapterRequest(name="not-there"), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        done = await stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="ad-b"), metadata=AUTH)
        assert (done.status, done.in_flight) == ("unloaded", 0)
        assert stack.engine.adapter_info() == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="ad-b"), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    run(model, model_dir, adapter_dir, scenario)


def test_unloading_with_requests_in_flight_lets_them_finish_and_spares_other_rows(
    model: NativeLlama, model_dir: Path, adapter_dir: Path
) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}

    async def scenario(stack: Stack) -> None:
        alone = {}
        for name in ("ad-a", "ad-b"):
            alone[name], _, _ = await stack.grpc_text(prompt_request(name, PROMPT, max_tokens=24))
        calls = {name: stack.stub.Generate(prompt_request(name, PROMPT, max_tokens=24)) for name in alone}
        streams = {name: aiter(call) for name, call in calls.items()}
        texts = {name: (await anext(streams[name])).chunk.text for name in alone}  # both are running
        response = await stack.http.delete("/v1/adapters/ad-a", headers=headers)
        assert response.json()["status"] == "draining" and response.json()["in_flight"] == 1
        refused = await stack.http.post("/v1/completions", json={"model": "ad-a", "prompt": "x", "max_tokens": 2})
        assert refused.status_code in (400, 404) and "unloaded" in refused.json()["error"]["message"]
        for name, stream in streams.items():
            async for message in stream:
                texts[name] += message.chunk.text if message.HasField("chunk") else ""
        assert texts == alone
        assert [a.name for a in stack.engine.adapter_info()] == ["ad-b"]

    run(model, model_dir, adapter_dir, scenario, cache=False)


def test_speculation_settings_per_request_over_both_protocols(
    model: NativeLlama, model_dir: Path, adapter_dir: Path
) -> None:
    """A request turns prompt lookup on for itself (the deployment has none): the text stays greedy decoding's
    and the drafts show in the per-adapter metrics; settings out of range are refused by name with the limits."""
    labels = {"adapter": "ad-a", "protocol": "rest"}

    async def scenario(stack: Stack) -> None:
        plain = await rest_text(stack, "ad-a", max_tokens=30, ignore_eos=True)
        before = sample("ftserve_spec_decode_num_drafts_total", labels)
        spec = {"drafter": "prompt-lookup", "num_tokens": 4}
        assert await rest_text(stack, "ad-a", max_tokens=30, ignore_eos=True, speculative=spec) == plain
        assert sample("ftserve_spec_decode_num_drafts_total", labels) > before
        refused = [
            ({"num_tokens": 0}, "greater than or equal to 1"),
            ({"num_tokens": 17}, "less than or equal to 16"),
            ({"drafter": "medusa"}, "'none', 'prompt-lookup' or 'draft-model'"),
            ({"k": 2}, "speculative.k"),
        ]
        for fields, needle in refused:
            body = {"model": "ad-a", "prompt": PROMPT, "max_tokens": 4, "speculative": fields}
            response = await stack.http.post("/v1/completions", json=body)
            assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
        request = prompt_request("ad-a", PROMPT)
        request.speculation.num_tokens = 99
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.grpc_text(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "16" in (err.value.details() or "")
        request.speculation.num_tokens = 3
        text, _, _ = await stack.grpc_text(request)
        assert text == await rest_text(stack, "ad-a")

    run(model, model_dir, adapter_dir, scenario, cache=False)
