"""The ``Engine`` protocol every backend implements, and the registry that builds one by name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from ftserve.config import EngineConfig
from ftserve.engine.request import GenerationOutput, GenerationRequest


@dataclass(frozen=True)
class StepUsage:
    """What one engine step computed: its wall time, and the tokens each adapter (``None``: the base model)
    had in it. Metrics share the step's cost among adapters by these token counts."""

    seconds: float
    tokens: dict[str | None, int]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health. Per-adapter maps are keyed by adapter name, ``None`` for the base."""

    num_running: int
    num_waiting: int
    running_by_adapter: dict[str | None, int] = field(default_factory=dict)
    waiting_by_adapter: dict[str | None, int] = field(default_factory=dict)
    # Fraction of KV-cache blocks referenced by each adapter's requests (a shared prefix block counts for
    # every request that holds it).
    kv_usage_by_adapter: dict[str | None, float] = field(default_factory=dict)
    step: StepUsage | None = None  # the step just run; None for a report between steps


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter as the admin API shows it."""

    name: str
    path: str
    version: str  # content hash of the weights
    rank: int
    residency: str  # device (in a compute slot), cpu (weights in memory) or disk (reloaded on next use)
    pinned: bool
    in_flight: int  # requests waiting or running on it
    draining: bool  # unloading: refuses new requests, goes once the in-flight ones finish


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

    def adapter_info(self) -> list[AdapterInfo]: ...

    async def load_adapter(self, name: str, path: Path) -> object:
        """Load a PEFT adapter folder under ``name``; raises ``AdapterError`` with the reason."""
        ...

    async def unload_adapter(self, name: str) -> int:
        """Unload ``name``: new requests for it are refused at once; requests in flight finish first. Returns
        how many were in flight (0: gone now). Raises ``AdapterNotFoundError`` for an unknown name."""
        ...

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """Keep ``name`` in a compute slot (never evicted while an unpinned adapter can go instead)."""
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
    import ftserve.engine.simple
    import ftserve.engine.trtllm_engine
    import ftserve.engine.vllm_engine  # noqa: F401  (each registers itself; vllm / tensorrt_llm load only at start)

    try:
        factory = _REGISTRY[config.backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {config.backend!r}; known: {sorted(_REGISTRY)}") from None
    return factory(model_dir, config)
