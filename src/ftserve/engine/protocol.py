"""The ``Engine`` protocol every backend implements, and the registry that builds one by name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ftserve.config import EngineConfig
from ftserve.engine.request import GenerationOutput, GenerationRequest


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health."""

    num_running: int
    num_waiting: int


class Tokenizer(Protocol):
    """What the API layer needs from the engine's tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@runtime_checkable
class Engine(Protocol):
    """Async text generation: submit a request, stream its outputs, cancel it.

    ``generate`` yields incremental outputs; the last one has ``finish_reason`` set. Closing the iterator
    early (client gone) cancels the request and frees what it held.
    """

    max_model_len: int
    tokenizer: Tokenizer
    on_step: Callable[[EngineStats], None] | None  # called after each step with fresh stats (metrics)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def adapters(self) -> list[str]: ...

    async def load_adapter(self, name: str, path: Path) -> object:
        """Load a PEFT adapter folder under ``name``; raises ``AdapterError`` with the reason."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    async def abort(self, request_id: str) -> None: ...


EngineFactory = Callable[[Path, EngineConfig], Engine]
_REGISTRY: dict[str, EngineFactory] = {}


def register_engine(name: str) -> Callable[[EngineFactory], EngineFactory]:
    def wrap(factory: EngineFactory) -> EngineFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def create_engine(model_dir: Path, config: EngineConfig) -> Engine:
    """Build the engine ``config.backend`` names; an unknown name lists the known ones."""
    import ftserve.engine.native
    import ftserve.engine.simple  # noqa: F401  (both register themselves)

    try:
        factory = _REGISTRY[config.backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {config.backend!r}; known: {sorted(_REGISTRY)}") from None
    return factory(model_dir, config)
