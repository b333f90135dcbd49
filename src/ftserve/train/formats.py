"""Training data formats: JSONL in Alpaca, chat or preference form, validated line by line.

Every record becomes one of two shapes the trainers use: :class:`Example` (a chat prompt and the assistant's
completion) or :class:`PreferencePair` (a chat prompt, a chosen and a rejected completion). A malformed line
raises :class:`DataError` naming ``file:line`` before anything is trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Kind = Literal["alpaca", "chat", "preference"]


class DataError(ValueError):
    """Training data is missing or malformed; the message names the file and line."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    group: str | None = Field(None, description="Split group: records sharing it land on the same side.")


class AlpacaRecord(_Record):
    instruction: str = Field(min_length=1)
    input: str = ""
    output: str = Field(min_length=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatRecord(_Record):
    messages: list[Message] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        if not any(m.role == "user" for m in messages[:-1]):
            raise ValueError("there must be a user message before the answer")
        return messages


class PreferenceRecord(_Record):
    prompt: str | list[Message]
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)

    @field_validator("rejected")
    @classmethod
    def _differs(cls, rejected: str, info) -> str:
        if rejected == info.data.get("chosen"):
            raise ValueError("rejected equals chosen")
        return rejected


@dataclass(frozen=True)
class Example:
    """One supervised example: the conversation up to the answer, and the answer the loss is taken on."""

    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...) ending with a user turn
    completion: str
    group: str | None = None

    @property
    def prompt_text(self) -> str:
        return "\n".join(content for _, content in self.prompt)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages."""
        return chat_messages(self.prompt)

    @property
    def text(self) -> str:
        return f"{self.prompt_text}\n{self.completion}"

    def to_json(self) -> dict:
        messages = [*self.messages, {"role": "assistant", "content": self.completion}]
        return {"messages": messages, **({"group": self.group} if self.group else {})}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred answer (DPO)."""

    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    group: str | None = None

    @property
    def prompt_text(self) -> str:
        return "\n".join(content for _, content in self.prompt)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages."""
        return chat_messages(self.prompt)

    @property
    def completion(self) -> str:
        return self.chosen

    @property
    def text(self) -> str:
        return f"{self.prompt_text}\n{self.chosen}\n{self.rejected}"

    def to_json(self) -> dict:
        out = {"prompt": self.messages, "chosen": self.chosen, "rejected": self.rejected}
        return {**out, **({"group": self.group} if self.group else {})}


def chat_messages(turns: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """``((role, content), ...)`` → the ``[{"role", "content"}]`` list chat templates take."""
    return [{"role": role, "content": content} for role, content in turns]


Item = Example | PreferencePair

_MODELS: dict[Kind, type[_Record]] = {"alpaca": AlpacaRecord, "chat": ChatRecord, "preference": PreferenceRecord}


def detect_kind(obj: dict) -> Kind:
    if "messages" in obj:
        return "chat"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "instruction" in obj:
        return "alpaca"
    raise ValueError(f"unknown record shape with keys {sorted(obj)}; expected messages, instruction or chosen")


def _to_item(record: _Record) -> Item:
    if isinstance(record, AlpacaRecord):
        user = f"{record.instruction}\n\n{record.input}" if record.input else record.instruction
        return Example((("user", user),), record.output, record.group)
    if isinstance(record, ChatRecord):
        turns = tuple((m.role, m.content) for m in record.messages[:-1])
        return Example(turns, record.messages[-1].content, record.group)
    assert isinstance(record, PreferenceRecord)  # the three models are exhaustive
    prompt = record.prompt if isinstance(record.prompt, list) else [Message(role="user", content=record.prompt)]
    return PreferencePair(tuple((m.role, m.content) for m in prompt), record.chosen, record.rejected, record.group)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "record"
    return f"{where}: {err['msg']}"


def load_jsonl(path: Path, kind: Kind | None = None) -> list[Item]:
    """Read and validate every line; all lines share one kind (given, or taken from the first record)."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    items: list[Item] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            try:
                kind = kind or detect_kind(obj)
                items.append(_to_item(_MODELS[kind].model_validate(obj)))
            except ValidationError as exc:
                raise DataError(f"{where}: not a valid {kind} record: {_first_error(exc)}") from None
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
    if not items:
        raise DataError(f"{path}: no records")
    return items


def write_jsonl(path: Path, items: Iterable[Item | dict]) -> str:
    """Write records (atomically) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for item in items:
            obj = item if isinstance(item, dict) else item.to_json()
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Dataset:
    """Items of one kind with where they came from."""

    items: list[Item]
    sources: dict[str, str] = field(default_factory=dict)  # path -> sha256
