"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """An error a client should see; never carries a traceback."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def payload_too_large(message: str) -> APIError:
    return APIError(413, message, "invalid_request_error", None, "request_too_large")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, "authentication_error", None, "invalid_api_key")


def not_found(message: str, param: str | None = None, code: str = "model_not_found") -> APIError:
    return APIError(404, message, "invalid_request_error", param, code)


def too_many_requests(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, "queue_full")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "service_unavailable", None, "not_ready")


def timeout(message: str) -> APIError:
    return APIError(504, message, "timeout_error", None, "deadline_exceeded")


def internal(message: str = "internal error; see the server log") -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def from_validation(exc: ValidationError) -> APIError:
    """The first pydantic error, phrased for a client, naming the parameter."""
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    kind = err.get("type", "")
    if kind == "missing":
        message = f"missing required parameter {param!r}"
    elif kind == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    else:
        message = f"invalid value for {param!r}: {err.get('msg', 'invalid')}"
    return bad_request(message, param=param)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; anything else is a 400 saying what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data
