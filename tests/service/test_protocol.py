"""OpenAI request schemas and the error bodies built from their validation failures."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ftserve.service import errors
from ftserve.service.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def _validation_error(model: type, data: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value


# --- chat completions --------------------------------------------------------------------------------


def test_minimal_chat_request_is_accepted() -> None:
    req = ChatCompletionRequest.model_validate(_chat())

    assert req.model == "m"
    assert [m.text() for m in req.messages] == ["hi"]


def test_chat_request_refuses_empty_messages() -> None:
    exc = _validation_error(ChatCompletionRequest, _chat(messages=[]))

    assert exc.errors()[0]["loc"] == ("messages",)
    assert errors.from_validation(exc).param == "messages"


@pytest.mark.parametrize("field", ["frobnicate", "best_of_n"])
def test_chat_request_refuses_unknown_fields_by_name(field: str) -> None:
    exc = _validation_error(ChatCompletionRequest, _chat(**{field: 1}))

    err = errors.from_validation(exc)
    assert "unrecognized" in err.message
    assert field in err.message
    assert err.param == field
    assert err.status == 400


def test_unknown_field_inside_a_message_is_named_with_its_path() -> None:
    data = _chat(messages=[{"role": "user", "content": "hi", "mood": "happy"}])

    err = errors.from_validation(_validation_error(ChatCompletionRequest, data))

    assert "unrecognized" in err.message
    assert err.param == "messages.0.mood"


@pytest.mark.parametrize("temperature", [2.0001, 3, 100.0])
def test_chat_request_refuses_temperature_above_two(temperature: float) -> None:
    exc = _validation_error(ChatCompletionRequest, _chat(temperature=temperature))

    err = errors.from_validation(exc)
    assert err.param == "temperature"
    assert "temperature" in err.message


@pytest.mark.parametrize("temperature", [0, 0.7, 2])
def test_chat_request_accepts_temperature_within_range(temperature: float) -> None:
    assert ChatCompletionRequest.model_validate(_chat(temperature=temperature)).temperature == temperature


def test_chat_request_refuses_an_unknown_role() -> None:
    data = _chat(messages=[{"role": "wizard", "content": "hi"}])

    assert errors.from_validation(_validation_error(ChatCompletionRequest, data)).param == "messages.0.role"


def test_list_of_text_parts_is_joined_by_text() -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "wor"}, {"type": "text", "text": "ld"}]

    message = ChatMessage.model_validate({"role": "user", "content": parts})

    assert message.text() == "".join(p["text"] for p in parts)


@pytest.mark.parametrize(("content", "expected"), [("plain", "plain"), (None, ""), ([], "")])
def test_message_text_for_string_missing_or_empty_content(content: Any, expected: str) -> None:
    assert ChatMessage(role="assistant", content=content).text() == expected


def test_non_text_content_part_is_refused() -> None:
    data = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}

    with pytest.raises(ValidationError):
        ChatMessage.model_validate(data)


@pytest.mark.parametrize(("stop", "expected"), [(None, []), ("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_stop_list_normalizes_none_string_and_list(stop: Any, expected: list[str]) -> None:
    assert ChatCompletionRequest.model_validate(_chat(stop=stop)).stop_list() == expected


# --- text completions --------------------------------------------------------------------------------


def test_completion_request_accepts_a_string_prompt() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Once upon a time"})

    assert req.prompt == "Once upon a time"


def test_completion_request_accepts_a_list_of_token_ids() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": [1, 22, 333]})

    assert req.prompt == [1, 22, 333]
    assert all(type(t) is int for t in req.prompt)


def test_completion_request_refuses_a_prompt_of_mixed_types() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": [1, {"x": 2}]})


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
        (CompletionRequest, {"prompt": "hi"}),
    ],
)
def test_from_validation_names_the_missing_model_parameter(model: type, data: dict[str, Any]) -> None:
    err = errors.from_validation(_validation_error(model, data))

    assert err.param == "model"
    assert "missing" in err.message
    assert "'model'" in err.message
    assert err.status == 400
    assert err.type == "invalid_request_error"


def test_from_validation_reports_an_invalid_value_with_its_parameter() -> None:
    err = errors.from_validation(_validation_error(ChatCompletionRequest, _chat(top_p=0)))

    assert err.param == "top_p"
    assert err.message.startswith("invalid value for 'top_p'")


@pytest.mark.parametrize(
    "error",
    [
        errors.bad_request("bad", param="x", code="c"),
        errors.not_found("no such model", param="model"),
        errors.too_many_requests("busy"),
        errors.unavailable("starting"),
        errors.internal(),
        errors.APIError(418, "teapot", "odd_error"),
    ],
)
def test_api_error_body_has_exactly_message_type_param_and_code(error: errors.APIError) -> None:
    body = error.body()

    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"] == {
        "message": error.message,
        "type": error.type,
        "param": error.param,
        "code": error.code,
    }


def test_api_error_body_keeps_the_given_values() -> None:
    err = errors.APIError(422, "nope", "invalid_request_error", param="n", code="too_many")

    assert err.body() == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": "n", "code": "too_many"}
    }
    assert err.status == 422
    assert str(err) == "nope"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.bad_request("x"), 400),
        (errors.not_found("x"), 404),
        (errors.too_many_requests("x"), 429),
        (errors.unavailable("x"), 503),
        (errors.internal(), 500),
    ],
)
def test_error_helpers_carry_their_http_status(error: errors.APIError, status: int) -> None:
    assert error.status == status
