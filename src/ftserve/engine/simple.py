"""A simple, correct engine: requests are interleaved token by token, each with its own KV cache.

Every step runs one forward per running request (no batching across requests) on a worker thread, so the
event loop stays free to accept and stream. The continuous-batching engine replaces this inside; the
``Engine`` interface stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftserve.config import EngineConfig
from ftserve.engine.detokenizer import IncrementalDetokenizer
from ftserve.engine.loader import HFTokenizer, eos_token_ids, load_model
from ftserve.engine.protocol import EngineStats, register_engine
from ftserve.engine.request import (
    AdapterNotFoundError,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
)
from ftserve.engine.sampler import make_generator, sample_token

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 4  # prompt tokens given to the detokenizer so the first word decodes with its space


@dataclass
class _Sequence:
    request: GenerationRequest
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    outputs: asyncio.Queue[GenerationOutput] = field(default_factory=asyncio.Queue)
    cache: object | None = None  # the model's KV cache object for this request; None before prefill
    pending: list[int] = field(default_factory=list)  # ids to feed the next forward (prompt, then last token)
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    finished: bool = False


class SimpleEngine:
    """One forward per running request per step; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: HFTokenizer,
        config: EngineConfig,
        device: torch.device,
        on_step: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.max_model_len = min(config.max_model_len, _model_context(model))
        self.on_step = on_step
        self._eos = eos_token_ids(model, tokenizer)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_dir(cls, model_dir: Path, config: EngineConfig) -> SimpleEngine:
        model, device, _ = load_model(model_dir, config)
        return cls(model, HFTokenizer(model_dir), config, device)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._closing = False
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="ftserve-engine-loop")

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for seq in [*self._running, *self._waiting]:
            self._finish(seq, FinishReason.ABORT)
        self._running.clear()
        self._waiting.clear()

    @property
    def ready(self) -> bool:
        return not self._closing and self._task is not None and not self._task.done()

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._running), num_waiting=len(self._waiting))

    def adapters(self) -> list[str]:
        return []  # this engine serves the base model only

    # -- requests --------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        seq = self._admit_check(request)
        await self.start()
        self._waiting.append(seq)
        self._notify()
        try:
            while True:
                out = await seq.outputs.get()
                yield out
                if out.finished:
                    return
        finally:
            if not seq.finished:  # the consumer left early: cancel at the next step boundary
                seq.aborted = True
                self._notify()

    async def abort(self, request_id: str) -> None:
        for seq in [*self._running, *self._waiting]:
            if seq.request.request_id == request_id:
                seq.aborted = True
        self._notify()

    def _admit_check(self, request: GenerationRequest) -> _Sequence:
        if self._closing:
            raise EngineNotReadyError("engine is shutting down")
        if request.adapter is not None:
            raise AdapterNotFoundError(f"adapter {request.adapter!r} not found; loaded adapters: none")
        if not request.prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(request.prompt_token_ids)} tokens; the context window is {self.max_model_len}"
            )
        # Requests that fit in free running slots do not count against the waiting limit.
        free_slots = max(0, self.config.max_num_seqs - len(self._running))
        if len(self._waiting) >= free_slots + self.config.max_queue:
            raise QueueFullError(f"queue is full ({self.config.max_queue} waiting requests); retry later")
        params = request.params
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, request.prompt_token_ids[-CONTEXT_TOKENS:])
        return _Sequence(request, detok, make_generator(params), pending=list(request.prompt_token_ids))

    # -- the step loop ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        while not self._closing:
            self._schedule()
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            outputs = await asyncio.to_thread(self._step, list(self._running))
            self._update(outputs)

    def _schedule(self) -> None:
        """Drop cancelled requests and admit waiting ones up to max_num_seqs."""
        for seq in [s for s in (*self._running, *self._waiting) if s.aborted]:
            self._finish(seq, FinishReason.ABORT)
        self._running = [s for s in self._running if not s.finished]
        self._waiting = deque(s for s in self._waiting if not s.finished)
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            self._running.append(self._waiting.popleft())
        self._report()

    def _step(self, batch: list[_Sequence]) -> list[tuple[_Sequence, GenerationOutput]]:
        """Run on a worker thread: one token for each request; a failure stays with its request."""
        results = []
        with torch.inference_mode():
            for seq in batch:
                if seq.aborted:
                    continue
                try:
                    results.append((seq, self._advance(seq)))
                except Exception as exc:
                    log.exception("request %s failed", seq.request.request_id)
                    results.append((seq, self._output(seq, "", [], FinishReason.ERROR, f"{type(exc).__name__}: {exc}")))
        return results

    def _update(self, outputs: list[tuple[_Sequence, GenerationOutput]]) -> None:
        for seq, out in outputs:
            if seq.finished:
                continue
            seq.finished = out.finished
            if out.finished:
                seq.cache = None  # frees its KV memory now
            seq.outputs.put_nowait(out)
        self._running = [s for s in self._running if not s.finished]
        self._report()

    def _advance(self, seq: _Sequence) -> GenerationOutput:
        ids = torch.tensor([seq.pending], device=self.device)
        result = self.model(input_ids=ids, past_key_values=seq.cache, use_cache=True)
        seq.cache = result.past_key_values
        token = sample_token(result.logits[0, -1], seq.request.params, seq.generator)
        seq.generated.append(token)
        seq.pending = [token]
        params = seq.request.params
        if token in self._eos and not params.ignore_eos:
            return self._output(seq, seq.detok.flush(), [token], FinishReason.STOP)
        text = seq.detok.add(token)
        if seq.detok.stopped:
            return self._output(seq, text, [token], FinishReason.STOP)
        total = len(seq.request.prompt_token_ids) + len(seq.generated)
        if len(seq.generated) >= params.max_tokens or total >= self.max_model_len:
            return self._output(seq, text + seq.detok.flush(), [token], FinishReason.LENGTH)
        return self._output(seq, text, [token], None)

    def _output(
        self, seq: _Sequence, text: str, ids: list[int], reason: FinishReason | None, error: str | None = None
    ) -> GenerationOutput:
        return GenerationOutput(
            request_id=seq.request.request_id,
            text=text,
            token_ids=ids,
            num_prompt_tokens=len(seq.request.prompt_token_ids),
            num_generated_tokens=len(seq.generated),
            finish_reason=reason,
            error=error,
        )

    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        if not seq.finished:
            seq.finished = True
            seq.cache = None
            seq.outputs.put_nowait(self._output(seq, "", [], reason))

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _report(self) -> None:
        if self.on_step is not None:
            self.on_step(self.stats())


def _model_context(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 1 << 20))


@register_engine("simple")
def _build(model_dir: Path, config: EngineConfig) -> SimpleEngine:
    return SimpleEngine.from_dir(model_dir, config)
