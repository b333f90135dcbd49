"""End to end on a real ``bentoml serve``: gRPC discovered by reflection, the ``ftserve client`` over both
protocols, adapter admin over REST, and every metric family on ``/metrics`` after mixed traffic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
TICKET = 'Route support ticket #311 from Ana: "my parcel arrived damaged and I want a refund"'

FAMILIES = (
    "ftserve_time_to_first_token_seconds", "ftserve_inter_token_latency_seconds",
    "ftserve_e2e_request_latency_seconds", "ftserve_request_queue_time_seconds", "ftserve_prompt_tokens",
    "ftserve_generation_tokens", "ftserve_request_success", "ftserve_num_requests_running",
    "ftserve_num_requests_waiting", "ftserve_kv_cache_usage_perc", "ftserve_prefix_cache_queries",
    "ftserve_prefix_cache_hits", "ftserve_response_cache_lookups", "ftserve_response_cache_hits",
    "ftserve_spec_decode_num_drafts", "ftserve_spec_decode_num_draft_tokens", "ftserve_spec_decode_num_accepted_tokens",
    "ftserve_adapter_load_seconds", "ftserve_adapter_resident", "ftserve_engine_busy_seconds", "ftserve_cost_usd",
    "ftserve_request_rejected", "ftserve_adapter_load_failures",
)  # fmt: skip


def reflected_generate(target: str, model: str, content: str) -> list[Any]:
    """Stream ``Generate`` knowing nothing but the service's name: every type comes from server reflection."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "ftserve.v1.Generation" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("ftserve.v1.Generation").FindMethodByName("Generate")
        request_type = GetMessageClass(method.input_type)
        response_type = GetMessageClass(method.output_type)
        request = request_type(model=model, sampling={"max_tokens": 32, "temperature": 0.0})
        request.chat.messages.add(role="user", content=content)
        call = channel.unary_stream(
            "/ftserve.v1.Generation/Generate",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return list(call(request, timeout=300))


def test_a_reflection_client_streams_a_shipped_adapter(server: Server) -> None:
    messages = reflected_generate(server.grpc_target, "support-router", TICKET)
    chunks = [m.chunk.text for m in messages if m.HasField("chunk")]
    final = messages[-1].final
    assert len(chunks) > 1 and final.finish_reason in ("stop", "length")
    assert "".join(chunks).startswith("ROUTE ") and "TICKET 311" in "".join(chunks)
    streamed_ids = [t for m in messages if m.HasField("chunk") for t in m.chunk.token_ids]
    assert 0 < len(streamed_ids) <= final.usage.completion_tokens <= 32
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ftserve.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def client_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    ftserve = Path(sys.executable).with_name("ftserve")
    connection = ["--url", server.url, "--target", server.grpc_target]
    return subprocess.run([str(ftserve), "client", *args, *connection], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FTSERVE_ADMIN_TOKEN": server.token})  # fmt: skip


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_the_client_streams_over_both_protocols(server: Server, protocol: str) -> None:
    done = client_cli(
        server, "generate", "--protocol", protocol, "--model", "support-router", "--message", TICKET,
        "--max-tokens", "32", "--temperature", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROUTE ") and '"finish_reason"' in done.stderr
    refused = client_cli(server, "generate", "--protocol", protocol, "--model", "nope", "--message", "hi")
    assert refused.returncode == 1 and ("NOT_FOUND" in refused.stderr or "404" in refused.stderr)


def test_admin_over_rest_needs_the_token_and_shows_residency(server: Server) -> None:
    assert httpx.get(f"{server.url}/v1/adapters").status_code == 401
    wrong = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    listing = client_cli(server, "adapters", "list", "--protocol", "rest")
    assert listing.returncode == 0, listing.stderr
    bad = httpx.post(f"{server.url}/v1/adapters", json={"name": "../adapters"},
                     headers={"authorization": f"Bearer {server.token}"})  # fmt: skip
    assert bad.status_code == 400
    cards = httpx.get(f"{server.url}/v1/adapters", headers={"authorization": f"Bearer {server.token}"}).json()
    shipped = {card["id"]: card for card in cards["data"]}
    assert {"support-router", "order-extract", "support-router-dpo"} <= shipped.keys()
    assert all(card["residency"] in ("device", "cpu", "disk") and len(card["version"]) == 16 for card in cards["data"])


def test_metrics_show_every_family_by_adapter_after_mixed_rest_and_grpc_traffic(server: Server) -> None:
    for _ in range(2):  # the second of each is a response-cache hit
        reflected_generate(server.grpc_target, "support-router", "Where is my order #77?")
        body = {"model": "order-extract", "messages": [{"role": "user", "content": "Ship 5 AB-1 to Oslo"}],
                "max_tokens": 16, "temperature": 0}  # fmt: skip
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in FAMILIES:
        assert name in families, f"{name} missing from /metrics"
        labelled = [s for s in families[name].samples if s.labels.get("adapter")]
        assert labelled, f"{name} has no sample with an adapter label"
    protocols = {s.labels.get("protocol") for s in families["ftserve_request_success"].samples}
    assert {"rest", "grpc"} <= protocols
    hits = {s.labels["adapter"] for s in families["ftserve_response_cache_hits"].samples if s.value > 0}
    assert {"support-router", "order-extract"} <= hits
    costs = {s.labels["adapter"]: s.value for s in families["ftserve_cost_usd"].samples if s.name.endswith("_total")}
    assert costs.get("support-router", 0) > 0 and costs.get("order-extract", 0) > 0
