"""HTTP routes of the OpenAI surface, mounted by the BentoML service at ``/v1``.

Thin: parse JSON, validate with the protocol models, call :class:`OpenAIServing`, turn errors into
OpenAI error bodies. No traceback ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ftserve.service import errors
from ftserve.service.admin import AdminService
from ftserve.service.protocol import AdapterLoadRequest, ChatCompletionRequest, CompletionRequest
from ftserve.service.serving import OpenAIServing

log = logging.getLogger(__name__)


def _error_response(err: errors.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _serving(request: Request) -> OpenAIServing:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise errors.unavailable("the model is still loading")
    return serving


async def _parse(request: Request, schema: type[BaseModel], max_bytes: int) -> Any:
    body = await request.body()
    if len(body) > max_bytes:
        raise errors.payload_too_large(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    data = errors.json_object(body)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation(exc) from None


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler) -> Handler:
    """Map every failure to an OpenAI error body; unexpected ones are logged, not shown."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except errors.APIError as err:
            return _error_response(err)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            return _error_response(errors.internal())

    return endpoint


class EventStreamResponse(StreamingResponse):
    """SSE that stops as soon as the client goes away.

    Under ASGI spec 2.4 Starlette stops listening for ``http.disconnect`` and relies on ``send`` failing,
    but uvicorn's ``send`` silently drops data for a closed connection: generation would run to the end.
    So always watch ``receive`` and cancel the stream (which cancels the request in the engine).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _respond(result: dict[str, Any] | Any) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(result, media_type="text/event-stream", headers=headers)


async def chat_completions(request: Request) -> Response:
    serving = _serving(request)
    req = await _parse(request, ChatCompletionRequest, serving.config.limits.max_request_bytes)
    return _respond(await serving.chat(req))


async def completions(request: Request) -> Response:
    serving = _serving(request)
    req = await _parse(request, CompletionRequest, serving.config.limits.max_request_bytes)
    return _respond(await serving.completion(req))


async def list_models(request: Request) -> Response:
    return JSONResponse(_serving(request).list_models())


async def get_model(request: Request) -> Response:
    name = request.path_params["name"]
    for card in _serving(request).list_models()["data"]:
        if card["id"] == name:
            return JSONResponse(card)
    raise errors.not_found(f"model {name!r} does not exist", param="model")


def _admin(request: Request) -> AdminService:
    admin = getattr(request.app.state, "admin", None)
    if admin is None:
        raise errors.unavailable("the model is still loading")
    admin.authorize(request.headers.get("authorization"))
    return admin


async def list_adapters(request: Request) -> Response:
    return JSONResponse(_admin(request).list())


async def load_adapter(request: Request) -> Response:
    admin = _admin(request)
    req = await _parse(request, AdapterLoadRequest, admin.serving.config.limits.max_request_bytes)
    return JSONResponse(await admin.load(req))


async def unload_adapter(request: Request) -> Response:
    return JSONResponse(await _admin(request).unload(request.path_params["name"]))


def build_app() -> Starlette:
    """The ``/v1`` app; ``app.state.serving`` and ``app.state.admin`` are set by the service once the engine
    is loaded."""
    routes = [
        Route("/chat/completions", _guarded(chat_completions), methods=["POST"]),
        Route("/completions", _guarded(completions), methods=["POST"]),
        Route("/models", _guarded(list_models), methods=["GET"]),
        Route("/models/{name:path}", _guarded(get_model), methods=["GET"]),
        Route("/adapters", _guarded(list_adapters), methods=["GET"]),
        Route("/adapters", _guarded(load_adapter), methods=["POST"]),
        # {name:path}: a name with "/" reaches the name check (400), not the router's 404.
        Route("/adapters/{name:path}", _guarded(unload_adapter), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes)
    app.state.serving = None
    app.state.admin = None
    return app
