"""The shell of backends whose scheduler, KV cache and batching live in another library (vLLM, TensorRT-LLM).

The library decides what runs when; this module gives it the same face as the native engine, so the
service, its metrics, its caches and the adapter admin work unchanged:

- **Tokens in, tokens out.** The service tokenizes (the model's own chat template); the library gets token
  ids and streams token ids back. Each new token goes through the native engine's acceptance rules
  (``TokenAcceptor``: end of sequence, stop strings, length), so text, stop strings and finish reasons are
  decided the same way on every backend. The library is told the stop strings and limits too, so it stops
  computing when we do; a request we finish first is aborted in the library.
- **Adapters.** A PEFT folder is checked here exactly as the native engine checks it (safetensors only,
  base model shape, rank limit) before the library sees it, then registered with a stable integer id and
  added to the library, which loads and evicts it by its own LRU. Unloading refuses new requests at once
  and removes the adapter from the library once its requests in flight have finished.
- **State for metrics.** Requests are waiting until their first token arrives, running after. The library
  reports no per-step timing through its public API, so every ``REPORT_S`` while requests are in flight
  the wall time since the last report becomes one "step", shared among adapters by the tokens each got in
  it (prompt tokens at the first output, then generated tokens): busy time and cost per adapter keep their
  meaning. KV usage per adapter is not visible from outside the library and is not reported.
- **Start-up** runs in the background: a library that takes minutes to start does not hold the service's
  start-up hook, and one that fails (or takes longer than its timeout) leaves the engine not ready with
  the reason, which ``/readyz`` reflects and every request gets as a 503, instead of a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from ftserve.config import EngineConfig
from ftserve.engine.base import DEADLINE_EXCEEDED, RequestState, TokenAcceptor
from ftserve.engine.library import LIBRARY_FINISH, BackendUpdate, ExternalAdapter
from ftserve.engine.lora import AdapterError, load_peft_adapter
from ftserve.engine.model import ModelShape
from ftserve.engine.protocol import AdapterInfo, EngineStats, StepUsage
from ftserve.engine.request import (
    AdapterNotFoundError,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
)

log = logging.getLogger(__name__)

REPORT_S = 0.5  # how often in-flight work is reported as a "step" to metrics


@dataclass(eq=False)
class _Flight:
    state: RequestState
    started: bool = False  # its first token has arrived
    done_in_backend: bool = False  # the library reported the request finished


class ExternalEngine(TokenAcceptor, ABC):
    """An ``Engine`` over a library's async generation API; subclasses implement the hooks below."""

    backend_name = "external"

    def __init__(self, model_dir: Path, config: EngineConfig, tokenizer: object, eos_ids: frozenset[int]) -> None:
        self.model_dir = model_dir
        self.config = config
        self.shape = ModelShape.from_dir(model_dir)
        super().__init__(tokenizer, eos_ids, min(config.max_model_len, self.shape.max_position))
        self.on_step: Callable[[EngineStats], None] | None = None
        self._adapters: dict[str, ExternalAdapter] = {}
        self._draining: set[str] = set()
        self._next_lora_id = 1
        self._flights: dict[str, _Flight] = {}
        self._unreported: Counter[str | None] = Counter()  # tokens computed per adapter since the last report
        self._start_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._reporter: asyncio.Task[None] | None = None
        self._running = False
        self._closing = False
        self.start_error: str | None = None  # why the library did not start, once it has failed

    # -- what a backend implements ----------------------------------------------------------------------

    @abstractmethod
    async def _start_backend(self) -> None:
        """Build and start the library's engine (may take minutes); raise with the reason on failure."""

    @abstractmethod
    async def _stop_backend(self) -> None: ...

    @abstractmethod
    def _alive(self) -> bool:
        """False once the library has died (its error is then in ``_dead_reason``)."""

    def _dead_reason(self) -> str:
        return f"the {self.backend_name} engine stopped"

    @abstractmethod
    def _stream(self, request: GenerationRequest, adapter: ExternalAdapter | None) -> AsyncIterator[BackendUpdate]:
        """Submit ``request`` to the library and yield its new tokens as they come."""

    @abstractmethod
    async def _abort_backend(self, request_id: str) -> None:
        """Stop ``request_id`` in the library. It may come after the request's stream was closed, or twice:
        it must be safe either way."""

    @abstractmethod
    async def _add_adapter(self, adapter: ExternalAdapter) -> None: ...

    @abstractmethod
    async def _remove_adapter(self, adapter: ExternalAdapter) -> None: ...

    def _resident_ids(self) -> set[int] | None:
        """Ids of adapters the library holds in its compute slots, when it says so cheaply; None: unknown."""
        return None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the library in the background; ``ready`` turns true once it serves."""
        if self._start_task is None:
            self._closing = False
            self._start_task = asyncio.create_task(self._start(), name=f"{self.backend_name}-start")
            self._reporter = asyncio.create_task(self._report_loop(), name=f"{self.backend_name}-metrics")

    async def _start(self) -> None:
        started = time.monotonic()
        log.info("%s engine starting for %s", self.backend_name, self.model_dir)
        built = False
        try:
            await asyncio.wait_for(self._start_backend(), self._start_timeout_s())
            built = True
            for adapter in list(self._adapters.values()):
                await self._add_adapter(adapter)
                adapter.added = True
        except Exception as exc:  # any failure to start is reported, never raised into a hang
            if isinstance(exc, TimeoutError):
                reason = f"did not start within {self._start_timeout_s():.0f} s"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self.start_error = f"the {self.backend_name} engine failed to start: {reason}"
            log.error("%s", self.start_error, exc_info=not isinstance(exc, TimeoutError))
            if built:  # it came up, then an adapter failed: do not leave it holding memory unused
                with contextlib.suppress(Exception):
                    await self._stop_backend()
            return
        self._running = True
        log.info("%s engine ready in %.1f s", self.backend_name, time.monotonic() - started)

    def _start_timeout_s(self) -> float:
        return 900.0

    async def wait_started(self) -> None:
        """Wait for the start-up to end, either way (for callers that need the library up)."""
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    async def stop(self) -> None:
        self._closing = True
        for task in (self._reporter, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for flight in list(self._flights.values()):
            flight.state.aborted = True
            await self._abort_backend(flight.state.request.request_id)
        if self._running:
            self._running = False
            await self._stop_backend()

    @property
    def ready(self) -> bool:
        return self._running and not self._closing and self._alive()

    def _check_ready(self) -> None:
        if self.ready:
            return
        if self.start_error is not None:
            raise EngineNotReadyError(self.start_error)
        if self._running and not self._alive():
            raise EngineNotReadyError(self._dead_reason())
        raise EngineNotReadyError(f"the {self.backend_name} engine is {'stopping' if self._closing else 'starting'}")

    # -- adapters -------------------------------------------------------------------------------------------

    def adapters(self) -> list[str]:
        return sorted(set(self._adapters) - self._draining)

    def adapter_info(self) -> list[AdapterInfo]:
        in_flight = Counter(f.state.request.adapter for f in self._flights.values())
        resident = self._resident_ids()
        infos = []
        for a in sorted(self._adapters.values(), key=lambda a: a.name):
            if resident is None:
                residency = "cpu" if a.added else "disk"
            else:
                residency = "device" if a.lora_id in resident else "disk"
            flying, draining = in_flight[a.name], a.name in self._draining
            infos.append(AdapterInfo(a.name, str(a.path), a.version, a.rank, residency, a.pinned, flying, draining))
        return infos

    async def load_adapter(self, name: str, path: Path) -> ExternalAdapter:
        """Check a PEFT folder as the native engine does, then hand it to the library (reloading replaces)."""
        if name in self._draining:
            raise AdapterError(f"adapter {name!r} is being unloaded; load it again once it is gone")
        if self.start_error is not None:
            raise AdapterError(self.start_error)
        checked = await asyncio.to_thread(load_peft_adapter, name, path, self.shape, self.config.max_lora_rank)
        previous = self._adapters.get(name)
        adapter = ExternalAdapter(name, path, checked.version, checked.rank, self._next_lora_id,
                                  pinned=previous.pinned if previous else False)  # fmt: skip
        self._next_lora_id += 1  # a new id per load: the library never serves stale weights under an old id
        if self._running:
            await self._add_adapter(adapter)
            adapter.added = True
            if previous is not None and previous.added and not self._in_flight(name):
                await self._remove_adapter(previous)
        self._adapters[name] = adapter
        log.info("adapter %s registered with %s (rank %d, version %s)", name, self.backend_name,
                 adapter.rank, adapter.version)  # fmt: skip
        return adapter

    async def unload_adapter(self, name: str) -> int:
        self._check_registered(name)
        in_flight = self._in_flight(name)
        if in_flight:
            self._draining.add(name)
            log.info("adapter %s unloading after its %d requests in flight", name, in_flight)
        else:
            await self._unregister(name)
        return in_flight

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        self._check_registered(name)
        adapter = self._adapters[name]
        adapter.pinned = pinned
        if self._running and adapter.added:
            task = asyncio.create_task(self._pin_backend(adapter), name=f"pin-{name}")
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)

    async def _pin_backend(self, adapter: ExternalAdapter) -> None:
        """Tell the library about a pin made after the adapter was added (no-op unless it can pin)."""

    def _check_registered(self, name: str) -> None:
        if name not in self._adapters or name in self._draining:
            raise AdapterNotFoundError(f"adapter {name!r} not found; loaded adapters: {self.adapters() or 'none'}")

    def _in_flight(self, name: str) -> int:
        return sum(1 for f in self._flights.values() if f.state.request.adapter == name)

    async def _unregister(self, name: str) -> None:
        self._draining.discard(name)
        adapter = self._adapters.pop(name)
        if adapter.added and self._running:
            await self._remove_adapter(adapter)
        log.info("adapter %s unloaded", name)

    # -- requests -------------------------------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> ExternalAdapter | None:
        self._check_ready()
        self.check_prompt(request)
        if request.speculation is not None and request.speculation.drafter is not None:
            raise ValueError(
                f"per-request speculation is not available with engine.backend {self.backend_name}: "
                "its speculative decoding is set for the whole deployment"
            )
        adapter = None
        if request.adapter is not None:
            self._check_registered(request.adapter)
            adapter = self._adapters[request.adapter]
        limit = self.config.max_num_seqs + self.config.max_queue
        if len(self._flights) >= limit:
            raise QueueFullError(f"queue is full ({self.config.max_queue} waiting requests); retry later")
        return adapter

    def max_new_tokens(self, request: GenerationRequest) -> int:
        """What the library may generate: the request's limit, within the context window."""
        return max(1, min(request.params.max_tokens, self.max_model_len - len(request.prompt_token_ids)))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        adapter = self._admit(request)
        state = self.new_state(request)
        flight = _Flight(state)
        rid = request.request_id
        self._flights[rid] = flight
        updates = aiter(self._stream(request, adapter))
        finished = False
        try:
            while not finished:
                try:
                    update = await _next_before(updates, request.deadline)
                except StopAsyncIteration:  # the library ended the stream without a finish: say so, never hang
                    finished = True
                    yield self.output(state, state.detok.flush(), [], FinishReason.ERROR, "the engine ended the stream")
                    return
                out = self._advance(flight, update)
                if out is not None:
                    finished = out.finished
                    yield out
        except TimeoutError:
            finished = True
            yield self.output(state, "", [], FinishReason.ABORT, DEADLINE_EXCEEDED)
        except (EngineNotReadyError, QueueFullError, AdapterNotFoundError, ValueError) as exc:
            if not flight.started:
                raise  # refused before any output: the caller turns it into a 4xx/5xx
            finished = True
            yield self.failed(state, exc)
        except Exception as exc:  # one failed request never takes the others down
            finished = True
            yield self.failed(state, exc)
        finally:
            self._flights.pop(rid, None)
            with contextlib.suppress(Exception):
                await updates.aclose()  # type: ignore[attr-defined]
            if not flight.done_in_backend:  # we finished first (stop string, deadline) or the consumer left
                with contextlib.suppress(Exception):
                    await self._abort_backend(rid)
            await self._after_request(request.adapter)

    def _advance(self, flight: _Flight, update: BackendUpdate) -> GenerationOutput | None:
        """Accept the update's tokens in order, stopping at the first that ends the request."""
        state = flight.state
        if not flight.started and (update.new_token_ids or update.finished):
            flight.started = True
            state.scheduled_at = time.monotonic()
            self._unreported[state.request.adapter] += len(state.request.prompt_token_ids)
            state.num_cached_tokens = update.num_cached_tokens or 0
        flight.done_in_backend = update.finished
        merged: GenerationOutput | None = None
        for token in update.new_token_ids:
            out = self.accept(state, token)
            self._unreported[state.request.adapter] += 1
            merged = out if merged is None else merged.followed_by(out)
            if out.finished:
                return merged
        if update.finished:
            last = self.output(
                state, state.detok.flush(), [], LIBRARY_FINISH.get(update.finish_reason or "stop", FinishReason.STOP)
            )
            return last if merged is None else merged.followed_by(last)
        return merged

    async def _after_request(self, name: str | None) -> None:
        if name is not None and name in self._draining and not self._in_flight(name):
            await self._unregister(name)  # the last request of an adapter being unloaded has finished

    async def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is not None:
            flight.state.aborted = True
            await self._abort_backend(request_id)

    # -- metrics --------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        running: Counter[str | None] = Counter()
        waiting: Counter[str | None] = Counter()
        for f in self._flights.values():
            (running if f.started else waiting)[f.state.request.adapter] += 1
        return EngineStats(sum(running.values()), sum(waiting.values()), dict(running), dict(waiting))

    async def _report_loop(self) -> None:
        last = time.monotonic()
        while not self._closing:
            await asyncio.sleep(REPORT_S)
            now = time.monotonic()
            tokens, self._unreported = self._unreported, Counter()
            stats = self.stats()
            busy = bool(tokens) or stats.num_running > 0
            step = StepUsage(now - last, dict(tokens)) if busy else None
            last = now
            if self.on_step is not None:
                try:
                    self.on_step(stats if step is None else dataclasses.replace(stats, step=step))
                except Exception:  # metrics never stop the engine
                    log.exception("metrics callback failed")


async def _next_before(updates: AsyncIterator[BackendUpdate], deadline: float | None) -> BackendUpdate:
    """The next update, or ``TimeoutError`` once ``deadline`` (a ``time.monotonic()`` instant) has passed."""
    if deadline is None:
        return await anext(updates)
    return await asyncio.wait_for(anext(updates), max(0.0, deadline - time.monotonic()))
