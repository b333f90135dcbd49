"""Speculative decoding inside continuous batching: greedy output equals plain decoding token for token,
with adapters, with rows that draft and rows that do not in one batch; rejected drafts leave no blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.lora import resolve_adapter_dir
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationOutput, GenerationRequest, SamplingParams

ADAPTERS = ["spec-a", "spec-b"]
PROMPTS = [
    ("Copy this list exactly, twice: apples, pears, plums, cherries, grapes, melons. "
     "apples, pears, plums, cherries, grapes, melons.", "spec-a"),
    ("Order 4471: ship 12 boxes of RZ-4410 to Oslo. Repeat the order line: Order 4471: ship", None),
    ("Tell me about the weather on Mars.", "spec-b"),
    ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n", None),
]  # fmt: skip


@pytest.fixture(scope="module")
def adapter_root(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec-adapters")
    make_random_adapters(model_dir, root, ADAPTERS, seed=21)
    return root


def generate(model_dir: Path, native: NativeLlama, adapter_root: Path, drafter: str) -> list[GenerationOutput]:
    tokenizer = HFTokenizer(model_dir)
    spec = {"drafter": drafter, "num_tokens": 4}
    config = EngineConfig.model_validate({"max_num_seqs": 8, "max_loras": 2, "speculative": spec})
    engine = NativeEngine(native, tokenizer, eos_token_ids(model_dir, tokenizer), config)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def last(req: GenerationRequest) -> GenerationOutput:
        return _joined([out async for out in engine.generate(req)])

    async def main() -> list[GenerationOutput]:
        await engine.start()
        try:
            for name in ADAPTERS:
                await engine.load_adapter(name, resolve_adapter_dir(name, [adapter_root]))
            reqs = [
                GenerationRequest(f"r{i}", tokenizer.encode(text), params, adapter)
                for i, (text, adapter) in enumerate(PROMPTS)
            ]
            return await asyncio.gather(*(last(r) for r in reqs))
        finally:
            assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing leaked by rollback
            await engine.stop()

    return asyncio.run(main())


def _joined(outs: list[GenerationOutput]) -> GenerationOutput:
    joined = outs[0]
    for out in outs[1:]:
        joined = joined.followed_by(out)
    return joined


def test_greedy_speculation_equals_plain_decoding_with_adapters(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path
) -> None:
    plain = generate(model_dir, native_model, adapter_root, "none")
    spec = generate(model_dir, native_model, adapter_root, "prompt-lookup")
    for want, got in zip(plain, spec, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert len(got.token_ids) == 40
    assert all(out.num_draft_tokens == 0 for out in plain)
    assert sum(out.num_accepted_tokens for out in spec) > 0  # drafts were really made and accepted
    assert any(out.num_draft_tokens > out.num_accepted_tokens for out in spec)  # and some rejected
