"""OpenAI serving logic over an ``Engine``: validate, build the prompt, generate, shape the response.

Routes call :class:`OpenAIServing`; it knows nothing of HTTP beyond returning a JSON-able dict (plain
answer) or an async iterator of SSE frames (streaming).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from ftserve.config import ServiceConfig
from ftserve.engine.base import DEADLINE_EXCEEDED
from ftserve.engine.lora import AdapterError, discover_adapters, resolve_adapter_dir
from ftserve.engine.protocol import Engine, EngineStats
from ftserve.engine.request import (
    AdapterNotFoundError,
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
)
from ftserve.service import errors, metrics
from ftserve.service.cost import CostMeter
from ftserve.service.jobs import Job, prepend, record, replay, track
from ftserve.service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_chunk,
    chat_response,
    completion_response,
    model_card,
    new_id,
)
from ftserve.service.response_cache import CachedResponse, ResponseCache, cache_key, cacheable

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class OpenAIServing:
    """Validation, adapter routing, generation and metrics for one protocol; :meth:`for_protocol` gives the
    same logic for another one, sharing the engine, the response cache and the cost meter."""

    def __init__(
        self,
        engine: Engine,
        config: ServiceConfig,
        protocol: str = "rest",
        cache: ResponseCache | None = None,
        cost: CostMeter | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.protocol = protocol
        self.cache = cache
        self.cost = cost
        self._gauges = metrics.EngineGauges(min_interval_s=0.25)  # shared by for_protocol copies

    def for_protocol(self, protocol: str) -> OpenAIServing:
        other = copy.copy(self)
        other.protocol = protocol
        return other

    def on_engine_step(self, stats: EngineStats) -> None:
        """The engine's per-step report: gauges, cost, and (once a second) adapter residency."""
        self._gauges.observe(stats)
        if stats.step is not None and self.cost is not None:
            self.cost.observe_step(stats.step)
        if self._gauges.adapters_due():
            self.refresh_adapter_metrics()

    def refresh_adapter_metrics(self) -> None:
        self._gauges.observe_adapters(self.engine.adapter_info())

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load (or reload) an adapter: timed, its cached responses dropped, residency refreshed."""
        started = time.monotonic()
        failures = metrics.ADAPTER_LOAD_FAILURES.labels(adapter=name)  # the series exists (at 0) from now on
        try:
            await self.engine.load_adapter(name, path)
        except AdapterError:
            failures.inc()
            raise
        metrics.ADAPTER_LOAD_TIME.labels(adapter=name).observe(time.monotonic() - started)
        if self.cache is not None:
            self.cache.invalidate(name)
        self.refresh_adapter_metrics()

    # -- models ----------------------------------------------------------------------------------------

    def list_models(self) -> dict[str, Any]:
        base = self.config.base_name
        cards = [model_card(base, "ftserve")]
        # Loaded adapters, and those in the allowed folders that load on first use.
        names = sorted(set(self.engine.adapters()) | set(discover_adapters(self.config.adapter_dirs)))
        cards += [model_card(name, "ftserve", parent=base) for name in names]
        return {"object": "list", "data": cards}

    async def resolve_adapter(self, model: str) -> str | None:
        """The OpenAI ``model`` field: the base model's name, or an adapter's.

        An adapter not loaded yet is loaded on first use when a folder of that name exists in the allowed
        adapter folders (names with paths are refused; safetensors only).
        """
        if model == self.config.base_name:
            return None
        if model in self.engine.adapters():
            return model
        try:
            path = resolve_adapter_dir(model, self.config.adapter_dirs)
        except AdapterError:
            known = [self.config.base_name, *self.engine.adapters()]
            raise errors.not_found(f"model {model!r} does not exist; available: {known}", param="model") from None
        try:
            await self.load_adapter(model, path)
        except AdapterError as exc:
            raise errors.bad_request(f"adapter {model!r} cannot be loaded: {exc}", param="model") from None
        return model

    async def load_startup_adapters(self) -> None:
        """Load the adapters the deployment names; a bad one stops the start-up with its reason."""
        for name in self.config.adapters:
            await self.load_adapter(name, resolve_adapter_dir(name, self.config.adapter_dirs))

    # -- validation ------------------------------------------------------------------------------------

    def _sampling(
        self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, prompt_len: int
    ) -> SamplingParams:
        limits = self.config.limits
        if req.n != 1:
            raise errors.bad_request(f"n={req.n} is not supported; only n=1", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise errors.bad_request(f"{name} is not supported; omit it or send 0", param=name)
        if req.logit_bias:
            raise errors.bad_request("logit_bias is not supported", param="logit_bias")
        stop = req.stop_list()
        if len(stop) > limits.max_stop_sequences:
            raise errors.bad_request(
                f"at most {limits.max_stop_sequences} stop sequences are allowed, got {len(stop)}", param="stop"
            )
        if any(len(s) > limits.max_stop_length for s in stop) or any(not s for s in stop):
            raise errors.bad_request(
                f"each stop sequence must have 1 to {limits.max_stop_length} characters", param="stop"
            )
        context = self.engine.max_model_len
        if prompt_len >= context:
            raise errors.bad_request(
                f"prompt has {prompt_len} tokens, but the context window is {context} tokens",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:  # no ask: as many as the default allows and the context still holds
            max_tokens = min(limits.default_max_tokens, context - prompt_len)
        elif max_tokens < 1 or max_tokens > limits.max_tokens:
            raise errors.bad_request(
                f"max_tokens must be between 1 and {limits.max_tokens} (the configured limit), got {max_tokens}",
                param="max_tokens",
            )
        elif prompt_len + max_tokens > context:
            raise errors.bad_request(
                f"the context window is {context} tokens, but {prompt_len + max_tokens} were requested "
                f"({prompt_len} in the prompt, {max_tokens} for the completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        defaults = self.config.sampling
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else req.top_k,
            seed=req.seed,
            stop=tuple(stop),
            ignore_eos=req.ignore_eos,
        )

    async def chat_job(self, req: ChatCompletionRequest) -> Job:
        if req.logprobs or req.top_logprobs:
            raise errors.bad_request("logprobs are not supported", param="logprobs")
        if req.tools or req.tool_choice not in (None, "none"):
            raise errors.bad_request("tool calling is not supported", param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise errors.bad_request("only response_format type 'text' is supported", param="response_format")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise errors.bad_request("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        adapter = await self.resolve_adapter(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt_ids = self.engine.tokenizer.apply_chat_template(messages)
        max_tokens = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        params = self._sampling(req, max_tokens, len(prompt_ids))
        return Job(new_id("chatcmpl"), req.model, adapter, prompt_ids, params, req.speculative)

    async def completion_job(self, req: CompletionRequest) -> Job:
        if req.echo:
            raise errors.bad_request("echo is not supported", param="echo")
        if req.logprobs is not None:
            raise errors.bad_request("logprobs are not supported", param="logprobs")
        if req.suffix:
            raise errors.bad_request("suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise errors.bad_request("best_of > 1 is not supported", param="best_of")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise errors.bad_request("batched prompts are not supported; send one prompt", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = self.engine.tokenizer.encode(prompt)
        else:
            vocab = getattr(self.engine.tokenizer, "vocab_size", None)
            if any(i < 0 or (vocab is not None and i >= vocab) for i in prompt):
                raise errors.bad_request("prompt token ids are out of the vocabulary", param="prompt")
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise errors.bad_request("prompt is empty", param="prompt")
        adapter = await self.resolve_adapter(req.model)
        params = self._sampling(req, req.max_tokens, len(prompt_ids))
        return Job(new_id("cmpl"), req.model, adapter, prompt_ids, params, req.speculative)

    # -- generation ------------------------------------------------------------------------------------

    async def _start(self, job: Job) -> AsyncIterator[GenerationOutput]:
        """Submit and wait for the first output, so submission errors still become API errors."""
        timeout = self.config.limits.request_timeout_s
        deadline = None if timeout is None else job.started + timeout
        if job.deadline is not None:
            deadline = job.deadline if deadline is None else min(deadline, job.deadline)
        stream = self.engine.generate(
            GenerationRequest(
                job.rid, job.prompt_ids, job.params, job.adapter, deadline=deadline, speculation=job.speculation
            )
        )
        try:
            first = await anext(stream)
        except QueueFullError as exc:
            self._rejected(job, "queue_full")
            raise errors.too_many_requests(str(exc)) from None
        except AdapterNotFoundError as exc:
            raise errors.not_found(str(exc), param="model") from None
        except EngineNotReadyError as exc:
            self._rejected(job, "not_ready")
            raise errors.unavailable(str(exc)) from None
        except ValueError as exc:
            raise errors.bad_request(str(exc)) from None
        except BaseException:
            await stream.aclose()
            raise
        return prepend(first, stream)

    def _rejected(self, job: Job, reason: str) -> None:
        """A request the server's state refused (counted against the availability SLO, unlike bad input)."""
        labels = {"adapter": metrics.label(job.adapter), "protocol": self.protocol}
        metrics.REQUEST_REJECTED.labels(**labels, reason=reason).inc()

    def _lookup(self, job: Job) -> CachedResponse | None:
        """The cached response of a deterministic request, keyed on the adapter's current version."""
        if self.cache is None or not cacheable(job.params):
            return None
        version = None
        if job.adapter is not None:
            version = next((a.version for a in self.engine.adapter_info() if a.name == job.adapter), None)
            if version is None:
                return None  # not loaded (or unloading): the engine will say so
        job.cache_key = cache_key(job.adapter, version, job.prompt_ids, job.params)
        labels = {"adapter": metrics.label(job.adapter), "protocol": self.protocol}
        metrics.RESPONSE_CACHE_LOOKUPS.labels(**labels).inc()
        hit = self.cache.get(job.cache_key)
        if hit is not None:
            metrics.RESPONSE_CACHE_HITS.labels(**labels).inc()
        return hit

    async def outputs(self, job: Job) -> AsyncIterator[GenerationOutput]:
        """All outputs of a job, from the response cache or the engine; records metrics when it ends,
        however it ends, and caches a deterministic answer that finished normally."""
        hit = self._lookup(job)
        job.from_cache = hit is not None
        stream = replay(job.rid, hit) if hit is not None else await self._start(job)
        kept: list[GenerationOutput] = []
        try:
            async for out in stream:
                track(job, out, self.protocol)
                if job.cache_key is not None and not job.from_cache:
                    kept.append(out)
                yield out
                if out.finished:
                    break
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled caller must still cancel the engine request
                await stream.aclose()
            record(job, self.protocol, self.cost)
            if kept:
                self._store(job, kept)

    def _store(self, job: Job, outputs: list[GenerationOutput]) -> None:
        """Cache a deterministic answer that finished normally (not aborted, not failed)."""
        if self.cache is None or job.cache_key is None or job.finish not in (FinishReason.STOP, FinishReason.LENGTH):
            return
        chunks = tuple((o.text, tuple(o.token_ids)) for o in outputs)
        response = CachedResponse(chunks, job.finish, len(job.prompt_ids), job.generated)
        self.cache.put(job.cache_key, job.adapter, response)

    async def _collect(self, job: Job) -> tuple[str, FinishReason, Usage]:
        parts: list[str] = []
        last: GenerationOutput | None = None
        async for out in self.outputs(job):
            parts.append(out.text)
            last = out
        if last is None or last.finish_reason is None or last.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
            raise self.failure(last)
        return "".join(parts), last.finish_reason, Usage.of(len(job.prompt_ids), last.num_generated_tokens)

    def failure(self, last: GenerationOutput | None) -> errors.APIError:
        if last is not None and last.error == DEADLINE_EXCEEDED:
            return errors.timeout(f"the request ran past its {self.config.limits.request_timeout_s:g} s deadline")
        detail = last.error if last is not None and last.error else "generation was aborted"
        return errors.internal(f"generation failed: {detail}")

    # -- endpoints -------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[bytes]:
        return await self._serve(await self.chat_job(req), req, chat=True)

    async def completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[bytes]:
        return await self._serve(await self.completion_job(req), req, chat=False)

    async def _serve(
        self, job: Job, req: ChatCompletionRequest | CompletionRequest, chat: bool
    ) -> dict[str, Any] | AsyncIterator[bytes]:
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(job, include_usage, chat=chat)
        text, finish, usage = await self._collect(job)
        build = chat_response if chat else completion_response
        return build(job.rid, job.model, text, _openai_finish(finish), usage)

    async def _stream(self, job: Job, include_usage: bool, chat: bool) -> AsyncIterator[bytes]:
        outputs = self.outputs(job)
        first = await anext(outputs)  # raises APIError before any byte is sent

        def frame(text: str, finish: str | None, usage: Usage | None = None) -> bytes:
            if chat:
                return sse(chat_chunk(job.rid, job.model, {"content": text} if text else {}, finish, usage))
            return sse(completion_response(job.rid, job.model, text, finish, usage, stream=True))

        async def frames() -> AsyncIterator[bytes]:
            try:
                if chat:
                    yield sse(chat_chunk(job.rid, job.model, {"role": "assistant", "content": ""}, None))
                out: GenerationOutput | None = first
                while out is not None:
                    if out.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                        yield sse(self.failure(out).body())
                        break
                    if out.text or out.finished:
                        finish = _openai_finish(out.finish_reason) if out.finished else None
                        yield frame(out.text, finish)
                    if out.finished and include_usage:
                        yield frame("", None, Usage.of(len(job.prompt_ids), out.num_generated_tokens))
                    out = None if out.finished else await anext(outputs, None)
                yield SSE_DONE
            finally:
                # The client left or we are done: cancel generation if still running. Shielded, because
                # the disconnect arrives as a cancellation that would otherwise cancel this await too.
                with anyio.CancelScope(shield=True):
                    await outputs.aclose()

        return frames()


def _openai_finish(reason: FinishReason | None) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"
