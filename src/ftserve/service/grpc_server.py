"""The gRPC API (``ftserve.v1.Generation``), served by ``grpc.aio`` beside REST in the same process.

BentoML 1.4 cannot serve gRPC for new-style services, so the service starts this server from its startup
hook, on BentoML's event loop and over the same engine object as REST: one batch mixes both protocols.
It also serves the standard ``grpc.health.v1`` health service and server reflection.

Several BentoML workers: each worker runs its own engine and its own gRPC server on the same port (gRPC
sets ``SO_REUSEPORT``, so the kernel spreads connections over the workers, as it does for HTTP). Adapter
admin then changes only the worker that takes the call; the shipped service runs one worker per process
(the engine batches internally) and scales out with replicas, where admin goes to each replica.

Errors map to status codes: 400 → INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 404 → NOT_FOUND,
429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE, 504 → DEADLINE_EXCEEDED, anything else → INTERNAL, with the
same message the REST API gives and never a traceback. A call's deadline becomes the request's deadline
in the engine, and a cancelled call (client gone, deadline passed) aborts its request at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from ftserve.config import GrpcConfig
from ftserve.engine.request import FinishReason
from ftserve.service import errors
from ftserve.service.admin import AdminService
from ftserve.service.protocol import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest
from ftserve.service.serving import OpenAIServing
from ftserve.v1 import ftserve_pb2 as pb
from ftserve.v1 import ftserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "ftserve.v1.Generation"

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

T = TypeVar("T")


def status_code(err: errors.APIError) -> grpc.StatusCode:
    return STATUS_CODES.get(err.status, grpc.StatusCode.INTERNAL)


def _validated(schema: type[T], data: dict[str, Any]) -> T:
    try:
        return schema.model_validate(data)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


def openai_request(req: pb.GenerateRequest) -> ChatCompletionRequest | CompletionRequest:
    """The equivalent OpenAI request, so both protocols share one validation and one code path."""
    data: dict[str, Any] = {"model": req.model}
    s = req.sampling
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if s.HasField(name):
            data[name] = getattr(s, name)
    if s.stop:
        data["stop"] = list(s.stop)
    if s.ignore_eos:
        data["ignore_eos"] = True
    if req.HasField("speculation"):
        spec = req.speculation
        data["speculative"] = {name: getattr(spec, name) for name in ("drafter", "num_tokens") if spec.HasField(name)}
    kind = req.WhichOneof("input")
    if kind == "chat":
        data["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        return _validated(ChatCompletionRequest, data)
    if kind == "prompt":
        return _validated(CompletionRequest, {**data, "prompt": req.prompt})
    raise errors.bad_request("give chat messages or a prompt", param="input")


Handler = Callable[..., Awaitable[Any]]


async def _abort(context: grpc.aio.ServicerContext, err: errors.APIError) -> None:
    await context.abort(status_code(err), err.message)


class GenerationServicer(pb_grpc.GenerationServicer):
    """The ``ftserve.v1.Generation`` methods (names as the proto spells them)."""

    def __init__(self, serving: OpenAIServing, admin: AdminService) -> None:
        self.serving = serving
        self.admin = admin

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            oa = openai_request(request)
            job = await (
                self.serving.chat_job(oa) if isinstance(oa, ChatCompletionRequest) else self.serving.completion_job(oa)
            )
            remaining = context.time_remaining()
            if remaining is not None:
                job.deadline = time.monotonic() + remaining
            last = None
            async for out in self.serving.outputs(job):
                last = out
                if out.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    raise self.serving.failure(out)
                if out.text or out.token_ids:
                    yield pb.GenerateResponse(chunk=pb.TokenChunk(text=out.text, token_ids=out.token_ids))
            if last is None or last.finish_reason is None:
                raise self.serving.failure(last)
            usage = pb.Usage(
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=last.num_generated_tokens,
                total_tokens=len(job.prompt_ids) + last.num_generated_tokens,
            )
            finish = "length" if last.finish_reason == FinishReason.LENGTH else "stop"
            final = pb.Final(id=job.rid, finish_reason=finish, usage=usage, cached=job.from_cache)
            yield pb.GenerateResponse(final=final)
        except errors.APIError as err:
            await _abort(context, err)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        cards = self.serving.list_models()["data"]
        models = [pb.Model(id=c["id"], owned_by=c["owned_by"], parent=c.get("parent") or "") for c in cards]
        return pb.ListModelsResponse(models=models)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        listing = await self._admin_call(context, lambda: _now(self.admin.list()))
        return pb.ListAdaptersResponse(
            adapters=[_status(card) for card in listing["data"]], available=listing["available"]
        )

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterStatus:
        data: dict[str, Any] = {"name": request.name, "reload": request.reload}
        if request.HasField("pinned"):
            data["pinned"] = request.pinned
        card = await self._admin_call(context, lambda: self.admin.load(_validated(AdapterLoadRequest, data)))
        return _status(card)

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        done = await self._admin_call(context, lambda: self.admin.unload(request.name))
        return pb.UnloadAdapterResponse(name=done["id"], status=done["status"], in_flight=done["in_flight"])

    async def _admin_call(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        try:
            metadata = dict(context.invocation_metadata() or ())
            self.admin.authorize(metadata.get("authorization"))
            return await call()
        except errors.APIError as err:
            await _abort(context, err)
            raise  # abort() raises; this line only satisfies the type checker


async def _now(value: T) -> T:
    return value


def _status(card: dict[str, Any]) -> pb.AdapterStatus:
    return pb.AdapterStatus(
        name=card["id"], version=card["version"], residency=card["residency"], pinned=card["pinned"],
        rank=card["rank"], in_flight=card["in_flight"], draining=card["draining"],
    )  # fmt: skip


class GrpcServer:
    """The running gRPC server of one worker: ``await GrpcServer.start(...)``, then ``await stop()``."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, address: str) -> None:
        self.server = server
        self.health = health_servicer
        self.address = address

    @classmethod
    async def start(cls, serving: OpenAIServing, admin: AdminService, config: GrpcConfig) -> GrpcServer:
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 1),  # several workers share the port (see the module docstring)
        ]
        server = grpc.aio.server(options=options)
        pb_grpc.add_GenerationServicer_to_server(GenerationServicer(serving, admin), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise RuntimeError(f"gRPC could not bind {config.host}:{config.port}")
        address = f"{config.host}:{port}"
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC %s serving on %s (health, reflection)", SERVICE_NAME, address)
        return cls(server, health_servicer, address)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
