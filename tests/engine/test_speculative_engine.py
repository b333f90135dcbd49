"""Speculative decoding inside continuous batching: greedy output equals plain decoding token for token,
with adapters, with rows that draft and rows that do not in one batch; rejected drafts leave no blocks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.draft_model import DraftModel, load_draft
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.lora import resolve_adapter_dir
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationOutput, GenerationRequest, SamplingParams, SpeculationParams

ADAPTERS = ["spec-a", "spec-b"]
PROMPTS = [
    ("Copy this list exactly, twice: apples, pears, plums, cherries, grapes, melons. "
     "apples, pears, plums, cherries, grapes, melons.", "spec-a"),
    ("Order 4471: ship 12 boxes of RZ-4410 to Oslo. Repeat the order line: Order 4471: ship", None),
    ("Tell me about the weather on Mars.", "spec-b"),
    ("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n", None),
]  # fmt: skip


@pytest.fixture(scope="module")
def plain(model_dir: Path, native_model: NativeLlama, adapter_root: Path) -> list[GenerationOutput]:
    return generate(model_dir, native_model, adapter_root, "none")


@pytest.fixture(scope="module")
def adapter_root(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spec-adapters")
    make_random_adapters(model_dir, root, ADAPTERS, seed=21)
    return root


def generate(
    model_dir: Path,
    native: NativeLlama,
    adapter_root: Path,
    drafter: str,
    draft: DraftModel | None = None,
    speculation: SpeculationParams | None = None,
    **spec_settings: object,
) -> list[GenerationOutput]:
    tokenizer = HFTokenizer(model_dir)
    spec = {"drafter": drafter, "num_tokens": 4, **spec_settings}
    config = EngineConfig.model_validate({"max_num_seqs": 8, "max_loras": 2, "speculative": spec})
    engine = NativeEngine(native, tokenizer, eos_token_ids(model_dir, tokenizer), config, draft)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def last(req: GenerationRequest) -> GenerationOutput:
        return _joined([out async for out in engine.generate(req)])

    async def main() -> list[GenerationOutput]:
        await engine.start()
        try:
            for name in ADAPTERS:
                await engine.load_adapter(name, resolve_adapter_dir(name, [adapter_root]))
            reqs = [
                GenerationRequest(f"r{i}", tokenizer.encode(text), params, adapter, speculation=speculation)
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
    model_dir: Path, native_model: NativeLlama, adapter_root: Path, plain: list[GenerationOutput]
) -> None:
    spec = generate(model_dir, native_model, adapter_root, "prompt-lookup", ngram_history=False)
    for want, got in zip(plain, spec, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert len(got.token_ids) == 40
    assert all(out.num_draft_tokens == 0 for out in plain)
    assert sum(out.num_accepted_tokens for out in spec) > 0  # drafts were really made and accepted
    assert any(out.num_draft_tokens > out.num_accepted_tokens for out in spec)  # and some rejected


def test_greedy_speculation_equals_plain_decoding_in_bfloat16(model_dir: Path, adapter_root: Path) -> None:
    """bfloat16 rounds every projection's output, so a sum whose order followed the row count (a 1-row decode
    against a 5-row verify) would move a logit by a whole bf16 step and, some layers later, the greedy token.
    The row-invariant CPU kernels give a token the same bits in either, with adapters too."""
    bf16 = NativeLlama.from_dir(model_dir, torch.device("cpu"), torch.bfloat16)
    alone = generate(model_dir, bf16, adapter_root, "none")
    spec = generate(model_dir, bf16, adapter_root, "prompt-lookup", ngram_history=False)
    _assert_same_tokens(alone, spec)
    assert sum(out.num_accepted_tokens for out in spec) > 0
    assert any(out.num_draft_tokens > out.num_accepted_tokens for out in spec)


def _assert_same_tokens(plain: list[GenerationOutput], spec: list[GenerationOutput]) -> None:
    for want, got in zip(plain, spec, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text


def test_draft_model_int8_copy_is_exact_with_adapters(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path, plain: list[GenerationOutput]
) -> None:
    """The draft (an INT8 copy of the base, no adapter) proposes; the target with each request's adapter
    decides: the tokens are plain decoding's."""
    draft = load_draft(SpeculativeConfig(drafter="draft-model"), model_dir, native_model)
    spec = generate(model_dir, native_model, adapter_root, "draft-model", draft, adaptive=False)
    _assert_same_tokens(plain, spec)
    assert draft.shared  # it reads the target's KV for the context
    assert draft.compiled is not None  # its plain passes ran in draft_layers.cpp
    assert sum(out.num_draft_tokens for out in spec) >= 4 * 30  # it drafted (4 a step, most steps)
    base = [out for out, (_, adapter) in zip(spec, PROMPTS, strict=True) if adapter is None]
    # On base requests the INT8 copy mostly agrees with its original: its context KV is right.
    assert sum(out.num_accepted_tokens for out in base) / sum(out.num_draft_tokens for out in base) > 0.7


def test_self_draft_with_every_layer_is_accepted_almost_always(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path, plain: list[GenerationOutput]
) -> None:
    """The served model drafting for itself (no adapter on the base requests): its proposals are the target's
    own greedy tokens, so nearly all are accepted, which holds only if the draft KV it keeps (catch-up on
    the bonus token, rollback of rejected drafts, reuse across steps) is right."""
    draft = DraftModel(native_model, name="self", share_kv=False)  # its own KV: catch-up and rollback
    spec = generate(model_dir, native_model, adapter_root, "draft-model", draft, adaptive=False)
    _assert_same_tokens(plain, spec)
    base = [out for out, (_, adapter) in zip(spec, PROMPTS, strict=True) if adapter is None]
    drafted = sum(out.num_draft_tokens for out in base)
    assert drafted > 0 and sum(out.num_accepted_tokens for out in base) / drafted > 0.9


def test_request_overrides_the_deployments_drafter(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path, plain: list[GenerationOutput]
) -> None:
    off = generate(
        model_dir, native_model, adapter_root, "prompt-lookup", speculation=SpeculationParams(drafter="none")
    )
    assert all(out.num_draft_tokens == 0 for out in off)
    on = SpeculationParams(drafter="prompt-lookup", num_tokens=2)
    spec = generate(model_dir, native_model, adapter_root, "none", speculation=on, adaptive=False)
    _assert_same_tokens(plain, spec)
    assert sum(out.num_draft_tokens for out in spec) > 0
    # A draft model the deployment does not have means no speculation, not a failure.
    missing = generate(
        model_dir, native_model, adapter_root, "none", speculation=SpeculationParams(drafter="draft-model")
    )
    _assert_same_tokens(plain, missing)
    assert all(out.num_draft_tokens == 0 for out in missing)


def test_a_draft_model_that_fails_to_load_turns_drafting_off(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = EngineConfig.model_validate(
        {"dtype": "float32", "speculative": {"drafter": "draft-model", "draft_model": str(tmp_path / "nowhere")}}
    )
    with caplog.at_level(logging.WARNING):
        engine = NativeEngine.from_dir(model_dir, config)
    assert engine.speculator.draft is None
    assert "draft model not loaded" in caplog.text and "nowhere" in caplog.text
