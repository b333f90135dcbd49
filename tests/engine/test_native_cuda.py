"""Device checks: the native engine on CUDA gives the reference's greedy tokens (skipped without CUDA)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftserve.config import EngineConfig
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationRequest, SamplingParams
from tests.engine.conftest import hf_greedy


@pytest.mark.gpu
def test_native_engine_on_cuda_matches_hf_greedy(model_dir: Path) -> None:
    engine = NativeEngine.from_dir(model_dir, EngineConfig(device="cuda", dtype="float32", max_num_seqs=8))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    texts = ["What is the capital of France?", "Name three rivers in Europe and say which is longest."]
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]

    async def main() -> list[list[int]]:
        await engine.start()
        try:

            async def one(i: int, ids: list[int]) -> list[int]:
                req = GenerationRequest(f"g{i}", ids, SamplingParams(max_tokens=16, temperature=0))
                return [t async for out in engine.generate(req) for t in out.token_ids]

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await engine.stop()

    for ids, got in zip(prompts, asyncio.run(main()), strict=True):
        assert got == hf_greedy(hf, ids, 16, engine._eos)
