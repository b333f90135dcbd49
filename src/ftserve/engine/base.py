"""What every in-process engine shares: per-request streams, the async step loop, and token acceptance.

A subclass decides what one step computes (``_plan``, then ``_execute``)
and how resources are released (``_release``). The loop itself is schedule → run → update:

    plan = self._plan()              # admit, schedule
    results = self._execute(plan)    # forward + sample
    self._update(results)            # stream outputs, retire finished requests
    await asyncio.sleep(STEP_YIELD_S)  # let streams flush, requests arrive, disconnects register
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ftserve.config import EngineConfig
from ftserve.engine.detokenizer import IncrementalDetokenizer
from ftserve.engine.heap import HeapTrimmer
from ftserve.engine.protocol import AdapterInfo, EngineStats, StepUsage
from ftserve.engine.request import (
    AdapterNotFoundError,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
)
from ftserve.engine.sampler import make_generator

log = logging.getLogger(__name__)

# A real (not zero) sleep between steps: with sleep(0) the server's I/O (client disconnects, /metrics)
# was starved while the engine was busy; half a millisecond costs ~3% at batch 1 and fixes it.
STEP_YIELD_S = 0.0005
CONTEXT_TOKENS = 4  # prompt tokens given to the detokenizer so the first word decodes with its space
DEADLINE_EXCEEDED = "deadline exceeded"


@dataclass(eq=False)
class RequestState:
    """One request inside an engine: its stream, text state and generated tokens."""

    request: GenerationRequest
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    outputs: asyncio.Queue[GenerationOutput] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    aborted: bool = False  # the consumer left or abort() was called: stop at the next step boundary
    finished: bool = False  # the last output was queued
    scheduled_at: float | None = None  # time.monotonic() when first scheduled
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first scheduling
    num_drafts: int = 0  # speculative decoding: steps that verified a draft for this request
    num_draft_tokens: int = 0  # speculative decoding: tokens drafted for this request
    num_accepted_tokens: int = 0  # ... and accepted by the target


Results = list[tuple[RequestState, GenerationOutput]]


class TokenAcceptor:
    """How every engine turns sampled tokens into streamed outputs: end-of-sequence, stop strings and length
    decided here, so the native engine and the backends that wrap another library (``engine/external.py``)
    stop and stream text the same way."""

    max_model_len: int
    on_step: Callable[[EngineStats], None] | None = None

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._eos = eos_ids

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a request (unless it asks to ignore them)."""
        return self._eos

    def new_state(self, request: GenerationRequest, generator: torch.Generator | None = None) -> RequestState:
        detok = IncrementalDetokenizer(self.tokenizer, request.params.stop, request.prompt_token_ids[-CONTEXT_TOKENS:])
        return RequestState(request, detok, generator)

    def check_prompt(self, request: GenerationRequest) -> None:
        if not request.prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(request.prompt_token_ids)} tokens; the context window is {self.max_model_len}"
            )

    # -- token acceptance ------------------------------------------------------------------------------

    def accept(self, state: RequestState, token: int) -> GenerationOutput:
        """Record a sampled token and decide whether the request is done (EOS, stop string, length)."""
        state.generated.append(token)
        params = state.request.params
        if token in self._eos and not params.ignore_eos:
            return self.output(state, state.detok.flush(), [token], FinishReason.STOP)
        text = state.detok.add(token)
        if state.detok.stopped:
            return self.output(state, text, [token], FinishReason.STOP)
        total = len(state.request.prompt_token_ids) + len(state.generated)
        if len(state.generated) >= params.max_tokens or total >= self.max_model_len:
            return self.output(state, text + state.detok.flush(), [token], FinishReason.LENGTH)
        return self.output(state, text, [token], None)

    def failed(self, state: RequestState, exc: BaseException) -> GenerationOutput:
        log.error("request %s failed: %s", state.request.request_id, exc, exc_info=exc)
        return self.output(state, "", [], FinishReason.ERROR, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def output(
        state: RequestState, text: str, ids: list[int], reason: FinishReason | None, error: str | None = None
    ) -> GenerationOutput:
        out = GenerationOutput(
            request_id=state.request.request_id,
            text=text,
            token_ids=ids,
            num_prompt_tokens=len(state.request.prompt_token_ids),
            num_generated_tokens=len(state.generated),
            finish_reason=reason,
            error=error,
        )
        if reason is not None and state.scheduled_at is not None:
            out.queue_s = state.scheduled_at - state.request.arrival_time
            out.num_cached_tokens = state.num_cached_tokens
            out.num_drafts = state.num_drafts
            out.num_draft_tokens, out.num_accepted_tokens = state.num_draft_tokens, state.num_accepted_tokens
        return out


class LoopEngine(TokenAcceptor, ABC):
    """The async shell of an engine; see the module docstring."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], max_model_len: int) -> None:
        super().__init__(tokenizer, eos_ids, max_model_len)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._heap = HeapTrimmer()  # freed activation buffers go back to the OS (see engine/heap.py)

    # -- subclass hooks --------------------------------------------------------------------------------

    @abstractmethod
    def _validate(self, request: GenerationRequest) -> None:
        """Raise a typed error for a request this engine cannot take (unknown adapter, full queue...)."""

    async def _prepare(self, request: GenerationRequest) -> None:
        """Async work a request needs before it can be queued (e.g. reloading an offloaded adapter)."""
        return None

    @abstractmethod
    def _enqueue(self, state: RequestState) -> None: ...

    @abstractmethod
    def _states(self) -> Iterable[RequestState]:
        """Every request waiting or running."""

    @abstractmethod
    def _plan(self) -> Any | None:
        """On the loop: drop aborted requests, admit and schedule; None when there is nothing to run."""

    @abstractmethod
    def _execute(self, plan: Any) -> Results:
        """Run the plan (forward + sample); return one output per request that advanced."""

    @abstractmethod
    def _release(self, state: RequestState) -> None:
        """Free what a finished request holds (KV blocks, caches) and forget it."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def _step_tokens(self, plan: Any) -> dict[str | None, int]:
        """Tokens each adapter (None: base) computes in ``plan``; metrics share the step's cost by them."""
        return {}

    def adapters(self) -> list[str]:
        return []

    def adapter_info(self) -> list[AdapterInfo]:
        return []

    async def unload_adapter(self, name: str) -> int:
        raise AdapterNotFoundError(f"adapter {name!r} not found; loaded adapters: {self.adapters() or 'none'}")

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        raise AdapterNotFoundError(f"adapter {name!r} not found; loaded adapters: {self.adapters() or 'none'}")

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._closing = False
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name=f"{type(self).__name__}-loop")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for state in list(self._states()):
            self._finish(state, FinishReason.ABORT)

    @property
    def ready(self) -> bool:
        return not self._closing and self._task is not None and not self._task.done()

    # -- requests --------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._closing:
            raise EngineNotReadyError("engine is shutting down")
        self.check_prompt(request)
        await self._prepare(request)
        self._validate(request)
        state = self.new_state(request, make_generator(request.params))
        await self.start()
        self._enqueue(state)
        self._notify()
        try:
            while True:
                out = await state.outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not state.finished:  # the consumer left early: cancel at the next step boundary
                state.aborted = True
                self._notify()

    async def abort(self, request_id: str) -> None:
        for state in self._states():
            if state.request.request_id == request_id:
                state.aborted = True
        self._notify()

    # -- the loop --------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        wake = self._wake
        if wake is None:
            raise RuntimeError("engine loop started without start()")
        while not self._closing:
            plan = self._plan()
            if plan is None:
                self._report()
                wake.clear()
                await wake.wait()
                continue
            # The step runs on the loop's own thread: torch's CPU kernels run multi-threaded only from the
            # main thread here (a worker thread measured ~1.7-2x slower per forward). Between steps the loop
            # yields, so outputs stream, new requests arrive and disconnects register at every step boundary.
            started = time.perf_counter()
            results = self._execute(plan)
            step = StepUsage(time.perf_counter() - started, self._step_tokens(plan))
            self._update(results)
            self._report(step)
            self._heap.maybe_trim()
            await asyncio.sleep(STEP_YIELD_S)

    def _update(self, results: Results) -> None:
        for state, out in results:
            if state.finished:
                continue
            state.finished = out.finished
            state.outputs.put_nowait(out)
            if out.finished:
                self._release(state)

    @staticmethod
    def _check_queue(num_running: int, num_waiting: int, config: EngineConfig) -> None:
        """Refuse a request that would have to wait behind a full queue; requests that fit in free running
        slots do not count against the waiting limit."""
        free_slots = max(0, config.max_num_seqs - num_running)
        if num_waiting >= free_slots + config.max_queue:
            raise QueueFullError(f"queue is full ({config.max_queue} waiting requests); retry later")

    def _drop_aborted(self) -> None:
        """Finish requests that were cancelled or ran past their deadline; their resources are freed now."""
        now = time.monotonic()
        for state in list(self._states()):
            deadline = state.request.deadline
            if state.aborted:
                self._finish(state, FinishReason.ABORT)
            elif deadline is not None and now > deadline:
                self._finish(state, FinishReason.ABORT, DEADLINE_EXCEEDED)

    def _finish(self, state: RequestState, reason: FinishReason, error: str | None = None) -> None:
        if not state.finished:
            state.finished = True
            state.outputs.put_nowait(self.output(state, "", [], reason, error))
            self._release(state)

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _report(self, step: StepUsage | None = None) -> None:
        if self.on_step is not None:
            stats = self.stats()
            self.on_step(stats if step is None else dataclasses.replace(stats, step=step))
