"""One request's life between the API and the engine: the job record, its stream, its metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ftserve.engine.request import FinishReason, GenerationOutput, SamplingParams, SpeculationParams
from ftserve.service import metrics
from ftserve.service.cost import CostMeter
from ftserve.service.response_cache import CachedResponse


@dataclass
class Job:
    """One request on its way through the engine (or the response cache), with what metrics need."""

    rid: str
    model: str  # the name the client used
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    speculation: SpeculationParams | None = None  # the request's own speculative-decoding settings
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() by which it must end (the client's, e.g. a gRPC deadline)
    first_token_at: float | None = None
    last_token_at: float | None = None
    generated: int = 0
    finish: FinishReason | None = None
    final: GenerationOutput | None = None
    cache_key: str | None = None  # set when the request is deterministic and the cache is on
    from_cache: bool = False


def track(job: Job, out: GenerationOutput, protocol: str) -> None:
    """Follow a job's outputs: first-token time, inter-token gaps (observed per token), finish."""
    new = out.num_generated_tokens - job.generated
    if new > 0:
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        elif job.last_token_at is not None:
            gap = (now - job.last_token_at) / new
            for _ in range(new):
                metrics.INTER_TOKEN_LATENCY.labels(metrics.label(job.adapter), protocol).observe(gap)
        job.last_token_at = now
    job.generated = out.num_generated_tokens
    job.finish = out.finish_reason
    if out.finished:
        job.final = out


def record(job: Job, protocol: str, cost: CostMeter | None) -> None:
    """Metrics of a job that ended, however it ended (a cache hit processed no tokens and costs nothing)."""
    adapter, final = metrics.label(job.adapter), job.final
    metrics.observe_request(
        adapter,
        protocol,
        ttft_s=None if job.first_token_at is None else job.first_token_at - job.started,
        e2e_s=time.monotonic() - job.started,
        finish_reason=str(job.finish or FinishReason.ABORT),
        engine=None if job.from_cache else (len(job.prompt_ids), job.generated, final),
    )
    if cost is not None and not job.from_cache:
        cost.observe_request(adapter, len(job.prompt_ids), job.generated)


async def prepend(first: GenerationOutput, rest: AsyncIterator[GenerationOutput]) -> AsyncIterator[GenerationOutput]:
    """``first``, then the rest of the engine's stream; closing this closes (cancels) the engine request."""
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def replay(rid: str, hit: CachedResponse) -> AsyncIterator[GenerationOutput]:
    """A cached response as the same sequence of streamed updates the engine gave."""
    generated = 0
    for i, (text, ids) in enumerate(hit.chunks):
        generated += len(ids)
        last = i == len(hit.chunks) - 1
        yield GenerationOutput(
            rid,
            text,
            list(ids),
            hit.num_prompt_tokens,
            hit.num_generated_tokens if last else generated,
            hit.finish_reason if last else None,
        )
