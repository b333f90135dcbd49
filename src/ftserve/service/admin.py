"""Adapter admin, shared by REST (``/v1/adapters``) and gRPC: list, load by name, pin, unload.

Every call needs ``Authorization: Bearer <token>`` with the token from the environment variable the
deployment names (``admin.token_env``, default ``FTSERVE_ADMIN_TOKEN``); while it is unset, admin is off.
Names are plain folder names inside the allowed adapter folders: a name with ``/``, ``..`` or an absolute
path is refused (400 / INVALID_ARGUMENT) before anything is read.
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

from ftserve.engine.lora import NAME_PATTERN, AdapterError, discover_adapters, resolve_adapter_dir
from ftserve.engine.protocol import AdapterInfo
from ftserve.engine.request import AdapterNotFoundError
from ftserve.service import errors
from ftserve.service.protocol import AdapterLoadRequest, adapter_card
from ftserve.service.serving import OpenAIServing

log = logging.getLogger(__name__)


class AdminService:
    def __init__(self, serving: OpenAIServing, token: str | None) -> None:
        self.serving = serving
        self.engine = serving.engine
        self._token = token or None
        self._token_env = serving.config.admin.token_env

    @classmethod
    def from_env(cls, serving: OpenAIServing) -> AdminService:
        token = os.environ.get(serving.config.admin.token_env)
        if not token:
            log.warning("adapter admin is off: $%s is not set", serving.config.admin.token_env)
        return cls(serving, token)

    def authorize(self, authorization: str | None) -> None:
        """Check an ``Authorization`` header value (constant-time); raises a 401 APIError."""
        if self._token is None:
            raise errors.unauthorized(f"the admin API is off: the server has no ${self._token_env} set")
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self._token.encode()):
            raise errors.unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")

    def list(self) -> dict[str, Any]:
        adapters = self.engine.adapter_info()
        loaded = {a.name for a in adapters}
        available = [n for n in discover_adapters(self.serving.config.adapter_dirs) if n not in loaded]
        return {"object": "list", "data": [adapter_card(a) for a in adapters], "available": available}

    async def load(self, req: AdapterLoadRequest) -> dict[str, Any]:
        name = _checked_name(req.name)
        if req.reload or name not in self.engine.adapters():
            try:
                path = resolve_adapter_dir(name, self.serving.config.adapter_dirs)
            except AdapterError as exc:
                raise errors.not_found(str(exc), param="name", code="adapter_not_found") from None
            try:
                await self.serving.load_adapter(name, path)
            except AdapterError as exc:
                raise errors.bad_request(f"adapter {name!r} cannot be loaded: {exc}", param="name") from None
        if req.pinned is not None:
            self.engine.pin_adapter(name, req.pinned)
        log.info("admin: adapter %s loaded%s", name, "" if req.pinned is None else f", pinned={req.pinned}")
        return adapter_card(self._info(name))

    async def unload(self, name: str) -> dict[str, Any]:
        name = _checked_name(name)
        try:
            in_flight = await self.engine.unload_adapter(name)
        except AdapterNotFoundError as exc:
            raise errors.not_found(str(exc), param="name", code="adapter_not_found") from None
        if self.serving.cache is not None:
            self.serving.cache.invalidate(name)
        self.serving.refresh_adapter_metrics()
        log.info("admin: adapter %s %s", name, f"draining ({in_flight} in flight)" if in_flight else "unloaded")
        return {"id": name, "object": "adapter", "status": "draining" if in_flight else "unloaded",
                "in_flight": in_flight}  # fmt: skip

    def _info(self, name: str) -> AdapterInfo:
        for info in self.engine.adapter_info():
            if info.name == name:
                return info
        raise errors.not_found(f"adapter {name!r} is not loaded", param="name", code="adapter_not_found")


def _checked_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise errors.bad_request(
            f"invalid adapter name {name!r}: a folder name of letters, digits, '.', '_' or '-' (no paths)",
            param="name",
        )
    return name
