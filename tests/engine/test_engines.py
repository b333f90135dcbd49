"""Both engines against a reference (HF generate on the same weights), and their failure handling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from ftserve.config import EngineConfig
from ftserve.engine.base import DEADLINE_EXCEEDED, LoopEngine
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.native import NativeEngine
from ftserve.engine.protocol import EngineStats
from ftserve.engine.request import (
    AdapterNotFoundError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
)
from ftserve.engine.simple import SimpleEngine
from tests.engine.conftest import hf_greedy

T = TypeVar("T")
PROMPTS = [
    "What is the capital of France?",
    "List three colours of the rainbow, then explain why the sky looks blue during the day.",
    "Hi",
]


Factory = Callable[..., LoopEngine]


@pytest.fixture(params=["simple", "native"])
def make(request: pytest.FixtureRequest, model_dir: Path, hf_model: torch.nn.Module) -> Factory:
    """Builds an engine of the parametrized kind on shared fp32 weights, with config overrides."""
    tokenizer = HFTokenizer(model_dir)

    def factory(**overrides: object) -> LoopEngine:
        config = EngineConfig.model_validate({"dtype": "float32", "max_num_seqs": 4, "max_queue": 2, **overrides})
        if request.param == "simple":
            return SimpleEngine(hf_model, tokenizer, eos_token_ids(model_dir, tokenizer), config, torch.device("cpu"))
        native = request.getfixturevalue("native_model")
        return NativeEngine(native, tokenizer, eos_token_ids(model_dir, tokenizer), config)

    return factory


@pytest.fixture
def engine(make: Factory) -> LoopEngine:
    return make()


def run(engine: LoopEngine, body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        await engine.start()
        try:
            return await body()
        finally:
            await engine.stop()

    return asyncio.run(main())


def chat_ids(engine: LoopEngine, text: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


async def collect(engine: LoopEngine, req: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(req)]


def tokens(outputs: list[GenerationOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def test_concurrent_greedy_requests_match_hf_generate_alone(engine: LoopEngine, hf_model: torch.nn.Module) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = [chat_ids(engine, p) for p in PROMPTS]

    async def body() -> list[list[GenerationOutput]]:
        reqs = [GenerationRequest(f"r{i}", ids, params) for i, ids in enumerate(prompts)]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    results = run(engine, body)
    for ids, outputs in zip(prompts, results, strict=True):
        assert tokens(outputs) == hf_greedy(hf_model, ids, 12, engine._eos)
        assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
        text = "".join(o.text for o in outputs)
        assert text == engine.tokenizer.decode(tokens(outputs), skip_special_tokens=True)


def test_stop_string_ends_generation_before_it(engine: LoopEngine) -> None:
    ids = chat_ids(engine, PROMPTS[1])
    plain = run(
        engine, lambda: collect(engine, GenerationRequest("a", ids, SamplingParams(max_tokens=24, temperature=0)))
    )
    text = "".join(o.text for o in plain)
    words = text.split()
    assert len(words) > 4, text
    stop = words[3]  # a word from the middle of the greedy answer: the answer must end right before it
    params = SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
    stopped = run(engine, lambda: collect(engine, GenerationRequest("b", ids, params)))
    assert "".join(o.text for o in stopped) == text[: text.index(stop)]
    assert stopped[-1].finish_reason == FinishReason.STOP
    assert plain[-1].finish_reason == FinishReason.LENGTH


def test_seeded_sampling_is_the_same_alone_and_in_company(engine: LoopEngine) -> None:
    ids = chat_ids(engine, PROMPTS[0])
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    alone = run(engine, lambda: collect(engine, GenerationRequest("s", ids, seeded)))

    async def in_company() -> list[GenerationOutput]:
        other = SamplingParams(max_tokens=10, temperature=1.0)
        results = await asyncio.gather(
            collect(engine, GenerationRequest("o1", chat_ids(engine, PROMPTS[1]), other)),
            collect(engine, GenerationRequest("s", ids, seeded)),
            collect(engine, GenerationRequest("o2", chat_ids(engine, PROMPTS[2]), other)),
        )
        return results[1]

    assert tokens(run(engine, in_company)) == tokens(alone)


def wait_for_idle(engine: LoopEngine) -> asyncio.Event:
    idle = asyncio.Event()

    def on_step(stats: EngineStats) -> None:
        if stats.num_running == 0 and stats.num_waiting == 0:
            idle.set()

    engine.on_step = on_step
    return idle


def test_closing_the_stream_cancels_the_request(engine: LoopEngine) -> None:
    ids = chat_ids(engine, PROMPTS[1])
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def body() -> tuple[int, EngineStats]:
        stream = engine.generate(GenerationRequest("c", ids, params))
        seen = [await anext(stream), await anext(stream)]
        idle = wait_for_idle(engine)
        await stream.aclose()
        await asyncio.wait_for(idle.wait(), timeout=60)
        return len(seen), engine.stats()

    try:
        seen, stats = run(engine, body)
    finally:
        engine.on_step = None
    assert seen == 2
    assert stats == EngineStats(num_running=0, num_waiting=0)


def test_a_failing_request_does_not_disturb_the_others(
    engine: LoopEngine, hf_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = [chat_ids(engine, p) for p in PROMPTS[:2]]
    real_accept = engine.accept

    def flaky_accept(state, token):  # type: ignore[no-untyped-def]
        if state.request.request_id == "bad" and state.generated:
            raise RuntimeError("injected fault")
        return real_accept(state, token)

    monkeypatch.setattr(engine, "accept", flaky_accept)

    async def body() -> list[list[GenerationOutput]]:
        return await asyncio.gather(
            collect(engine, GenerationRequest("good0", prompts[0], params)),
            collect(engine, GenerationRequest("bad", prompts[1], params)),
            collect(engine, GenerationRequest("good1", prompts[1], params)),
        )

    good0, bad, good1 = run(engine, body)
    assert bad[-1].finish_reason == FinishReason.ERROR
    assert "injected fault" in (bad[-1].error or "")
    assert tokens(good0) == hf_greedy(hf_model, prompts[0], 8, engine._eos)
    assert tokens(good1) == hf_greedy(hf_model, prompts[1], 8, engine._eos)


def test_full_queue_refuses_new_requests(make: Factory) -> None:
    small = make(max_num_seqs=1, max_queue=1)
    engine = small
    ids = chat_ids(engine, PROMPTS[0])
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def body() -> None:
        running = small.generate(GenerationRequest("run", ids, long))
        await anext(running)  # admitted and decoding
        waiting = small.generate(GenerationRequest("wait", ids, long))
        queued = asyncio.Event()
        small.on_step = lambda stats: queued.set() if stats.num_waiting == 1 else None
        pending = asyncio.ensure_future(anext(waiting))  # sits in the queue behind "run"
        await asyncio.wait_for(queued.wait(), timeout=60)
        with pytest.raises(QueueFullError, match="queue is full"):
            await anext(small.generate(GenerationRequest("third", ids, long)))
        await running.aclose()
        await pending
        await waiting.aclose()

    run(small, body)
    assert small.stats() == EngineStats(num_running=0, num_waiting=0)


def test_unknown_adapter_and_overlong_prompt_are_refused(engine: LoopEngine) -> None:
    params = SamplingParams(max_tokens=4)

    async def body() -> None:
        with pytest.raises(AdapterNotFoundError, match="missing"):
            await anext(engine.generate(GenerationRequest("a", [1, 2, 3], params, adapter="missing")))
        too_long = [1] * engine.max_model_len
        with pytest.raises(ValueError, match=str(engine.max_model_len)):
            await anext(engine.generate(GenerationRequest("b", too_long, params)))

    run(engine, body)


def test_request_past_its_deadline_is_aborted_and_freed(engine: LoopEngine) -> None:
    ids = chat_ids(engine, PROMPTS[0])
    past = time.monotonic() - 1.0
    req = GenerationRequest("late", ids, SamplingParams(max_tokens=50, temperature=0), deadline=past)
    outputs = run(engine, lambda: collect(engine, req))
    assert outputs[-1].finish_reason == FinishReason.ABORT
    assert outputs[-1].error == DEADLINE_EXCEEDED
    assert engine.stats() == EngineStats(num_running=0, num_waiting=0)
