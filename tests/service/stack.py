"""A real serving stack in one event loop: the native engine on the bundled model, REST (ASGI) and a gRPC
server on a loopback socket, sharing the engine, the response cache and the cost meter as in the service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from ftserve.config import EngineConfig, GrpcConfig, ServiceConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.service.admin import AdminService
from ftserve.service.cost import CostMeter
from ftserve.service.grpc_server import GrpcServer
from ftserve.service.response_cache import ResponseCache
from ftserve.service.routes import build_app
from ftserve.service.serving import OpenAIServing
from ftserve.v1 import ftserve_pb2 as pb
from ftserve.v1 import ftserve_pb2_grpc as pb_grpc

TOKEN = "test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Stack:
    engine: NativeEngine
    serving: OpenAIServing
    stub: pb_grpc.GenerationStub
    http: httpx.AsyncClient
    base: str
    generate_calls: list[str] = field(default_factory=list)  # request ids the engine was asked to generate

    async def idle(self, limit_s: float = 60.0) -> None:
        """Wait until the engine holds no request (condition polling with an upper bound)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while self.engine.stats().num_running or self.engine.stats().num_waiting:
            if loop.time() > deadline:
                raise AssertionError(f"engine still busy after {limit_s}s: {self.engine.stats()}")
            await asyncio.sleep(0.01)

    async def grpc_text(self, request: pb.GenerateRequest, **kwargs: Any) -> tuple[str, pb.Final, int]:
        """Text, final message and number of chunks of a streamed gRPC completion."""
        text, chunks, final = "", 0, None
        async for message in self.stub.Generate(request, **kwargs):
            if message.HasField("chunk"):
                text += message.chunk.text
                chunks += 1
            else:
                final = message.final
        assert final is not None
        return text, final, chunks


def prompt_request(model: str, prompt: str, max_tokens: int = 12, **sampling: Any) -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0.0), **sampling)
    return pb.GenerateRequest(model=model, prompt=prompt, sampling=params)


@asynccontextmanager
async def serving_stack(
    model: NativeLlama, model_dir: Path, adapter_dir: Path, cache: bool = True, **engine: Any
) -> AsyncIterator[Stack]:
    settings = {"max_num_seqs": 4, "max_model_len": 256, "max_loras": 2, "max_lora_rank": 16, **engine}
    config = ServiceConfig(
        model=str(model_dir),
        adapter_dirs=[adapter_dir],
        engine=EngineConfig(**settings),
        grpc=GrpcConfig(port=0),
    )
    tokenizer = HFTokenizer(model_dir)
    native = NativeEngine(model, tokenizer, eos_token_ids(model_dir, tokenizer), config.engine)
    response_cache = ResponseCache(1 << 20, 600) if cache else None
    serving = OpenAIServing(native, config, "rest", response_cache, CostMeter(config.pricing))
    native.on_step = serving.on_engine_step
    admin = AdminService(serving, TOKEN)
    stack_calls: list[str] = []
    generate = native.generate

    def counted(request: Any) -> Any:
        stack_calls.append(request.request_id)
        return generate(request)

    native.generate = counted  # type: ignore[method-assign]  (counts engine use; the engine is real)
    app = build_app()
    app.state.serving, app.state.admin = serving, admin
    await native.start()
    server = await GrpcServer.start(serving.for_protocol("grpc"), admin, config.grpc)
    channel = grpc.aio.insecure_channel(server.address)
    transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/v1", app)]))  # as the service mounts it
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            yield Stack(native, serving, pb_grpc.GenerationStub(channel), http, config.base_name, stack_calls)
    finally:
        await channel.close()
        await server.stop(0)
        await native.stop()
