"""The adapters the project ships: complete, described by their cards, and accurate when served.

The accuracy check runs the shipped adapters through the native serving engine (bf16, as served) on the
hand-written held-out items, whose phrasings the generators never made, and scores them with each task's
exact-match scorer against the items' labels.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ftserve.config import PROJECT_ROOT, EngineConfig
from ftserve.engine.lora import resolve_adapter_dir
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.train.formats import Example, load_jsonl
from ftserve.train.tasks import get_task

ADAPTERS = PROJECT_ROOT / "adapters"
SHIPPED = {"support-router": "support-router", "order-extract": "order-extract", "support-router-dpo": "support-router"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_adapter_is_complete_and_its_card_records_how_it_was_made(name: str) -> None:
    folder = ADAPTERS / name
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "card.json"]
    card = json.loads((folder / "card.json").read_text())
    assert card["name"] == name and card["task"] == SHIPPED[name]
    assert card["base"]["ref"] == "smollm2-135m-instruct" and card["base"]["gguf_sha256"]
    assert len(card["data"]["sha256"]) == 64
    for variant in card["metrics"].values():
        assert {"heldout.exact_match", "general_perplexity"} <= set(variant)
    assert (PROJECT_ROOT / "adapters" / f"{name}.yaml").is_file()  # the config that reproduces it


def serve_all(model_dir: Path, jobs: list[tuple[str, Example]]) -> list[str]:
    engine = NativeEngine.from_dir(model_dir, EngineConfig(max_num_seqs=16))
    params = SamplingParams(max_tokens=40, temperature=0.0)

    async def answer(i: int, adapter: str, item: Example) -> str:
        messages = [{"role": r, "content": c} for r, c in item.prompt]
        req = GenerationRequest(f"r{i}", engine.tokenizer.apply_chat_template(messages), params, adapter)
        return "".join([out.text async for out in engine.generate(req)])

    async def main() -> list[str]:
        await engine.start()
        try:
            for name in {adapter for adapter, _ in jobs}:
                await engine.load_adapter(name, resolve_adapter_dir(name, [ADAPTERS]))
            return await asyncio.gather(*(answer(i, a, item) for i, (a, item) in enumerate(jobs)))
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_shipped_adapters_answer_unseen_phrasings_through_the_serving_engine(model_dir: Path) -> None:
    jobs: list[tuple[str, Example]] = []
    for adapter, task in SHIPPED.items():
        items = load_jsonl(PROJECT_ROOT / "data" / "heldout" / f"{task}.handwritten.jsonl")
        jobs += [(adapter, item) for item in items if isinstance(item, Example)]
    answers = serve_all(model_dir, jobs)
    for adapter, task_name in SHIPPED.items():
        task = get_task(task_name)
        pairs = [(a, item) for (name, item), a in zip(jobs, answers, strict=True) if name == adapter]
        scored = [task.score(a, item.completion) for a, item in pairs]
        assert sum(scored) / len(scored) >= 0.8, (adapter, scored)
