"""Native engine specifics: chunked prefill, prefix caching, preemption, and block accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationOutput, GenerationRequest, SamplingParams
from tests.engine.conftest import hf_greedy

SYSTEM = "You are a meticulous assistant for a shipping company. " * 12


def build(model_dir: Path, native: NativeLlama, **overrides: object) -> NativeEngine:
    tokenizer = HFTokenizer(model_dir)
    config = EngineConfig.model_validate({"dtype": "float32", "max_num_seqs": 8, **overrides})
    return NativeEngine(native, tokenizer, eos_token_ids(model_dir, tokenizer), config)


def prompts(engine: NativeEngine) -> list[list[int]]:
    questions = ["Where is my parcel?", "How do I change my address?", "Can I pay by card?"]
    return [
        engine.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in questions
    ]


def run_all(engine: NativeEngine, reqs: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    async def collect(req: GenerationRequest) -> list[GenerationOutput]:
        return [out async for out in engine.generate(req)]

    async def main() -> list[list[GenerationOutput]]:
        await engine.start()
        try:
            return await asyncio.gather(*(collect(r) for r in reqs))
        finally:
            await engine.stop()

    return asyncio.run(main())


def tokens(outputs: list[GenerationOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def test_chunked_prefill_in_mixed_batches_matches_hf(
    model_dir: Path, native_model: NativeLlama, hf_model: torch.nn.Module
) -> None:
    # A 24-token budget forces every prompt (>100 tokens) into chunks while others decode.
    engine = build(model_dir, native_model, max_num_batched_tokens=24, enable_prefix_caching=False)
    ids = prompts(engine)
    results = run_all(engine, [GenerationRequest(f"r{i}", p, greedy(6)) for i, p in enumerate(ids)])
    for p, outs in zip(ids, results, strict=True):
        assert tokens(outs) == hf_greedy(hf_model, p, 6, engine._eos)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(model_dir: Path, native_model: NativeLlama) -> None:
    engine = build(model_dir, native_model, block_size=8)
    ids = prompts(engine)
    first = run_all(engine, [GenerationRequest("warm", ids[0], greedy(8))])[0]
    assert engine.blocks.prefix_hits == 0
    again = run_all(engine, [GenerationRequest(f"r{i}", p, greedy(8)) for i, p in enumerate(ids)])
    assert engine.blocks.prefix_hits > 0  # the shared system prompt came from the cache
    cold = build(model_dir, native_model, block_size=8, enable_prefix_caching=False)
    misses = run_all(cold, [GenerationRequest(f"r{i}", p, greedy(8)) for i, p in enumerate(ids)])
    assert tokens(again[0]) == tokens(first)
    assert [tokens(o) for o in again] == [tokens(o) for o in misses]
    assert cold.blocks.prefix_hits == 0


def test_preemption_under_kv_pressure_keeps_outputs_exact(
    model_dir: Path, native_model: NativeLlama, hf_model: torch.nn.Module
) -> None:
    ids = prompts(build(model_dir, native_model))
    # Room for two prompts plus one block: two are admitted, then growing while decoding forces preemption.
    blocks = 2 * -(-max(len(p) for p in ids) // 16) + 1
    engine = build(
        model_dir,
        native_model,
        block_size=16,
        kv_cache_tokens=blocks * 16,
        max_model_len=256,
        enable_prefix_caching=False,
    )
    results = run_all(engine, [GenerationRequest(f"r{i}", p, greedy(40)) for i, p in enumerate(ids)])
    assert engine.scheduler.num_preemptions > 0
    for p, outs in zip(ids, results, strict=True):
        assert tokens(outs) == hf_greedy(hf_model, p, 40, engine._eos)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_every_block_is_free_after_cancellations(model_dir: Path, native_model: NativeLlama) -> None:
    engine = build(model_dir, native_model)
    ids = prompts(engine)

    async def main() -> None:
        await engine.start()
        streams = [engine.generate(GenerationRequest(f"c{i}", p, greedy(100))) for i, p in enumerate(ids)]
        for stream in streams:
            await anext(stream)
        idle = asyncio.Event()
        engine.on_step = lambda stats: idle.set() if stats.num_running == stats.num_waiting == 0 else None
        for stream in streams:
            await stream.aclose()
        await asyncio.wait_for(idle.wait(), timeout=60)
        await engine.stop()

    asyncio.run(main())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)
