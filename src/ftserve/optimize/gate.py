"""The quality gate: perplexity and task exact match of a model against its reference, on the native engine.

Both are measured as the model would be served: in the dtype ``engine.dtype`` picks for it (or the
recipe's), with the gate's adapter applied unmerged when it names one. Exact match is scored on the
hand-written held-out files, then on the training config's held-out split (the items the adapter never
trained on), greedy, by the task's own scorer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import torch

from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids, pick_dtype
from ftserve.engine.lora import LoraAdapter, load_peft_adapter
from ftserve.engine.model import ModelShape, NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.optimize.merge import MAX_MERGE_RANK, check_adapter
from ftserve.optimize.quality import lora_for, perplexity
from ftserve.optimize.recipe import GateStep
from ftserve.train.formats import DataError, Example, load_jsonl
from ftserve.train.pipeline import split_of
from ftserve.train.settings import load_train_config
from ftserve.train.tasks import get_task


def check_gate(step: GateStep) -> None:
    for path in (step.text, *step.heldout, step.heldout_split):
        if path is not None and not path.is_file():
            raise DataError(f"gate: {str(path)!r} does not exist")
    if step.adapter is not None:
        check_adapter("gate", step.adapter)
    task = task_of(step)
    if (step.heldout or step.heldout_split) and task is None:
        raise DataError("gate: exact match needs a task (task: ..., or a heldout_split config with one)")
    if task:
        get_task(task)


def task_of(step: GateStep) -> str | None:
    if step.task or step.heldout_split is None:
        return step.task
    return load_train_config(step.heldout_split).task


def gate_items(step: GateStep) -> list[Example]:
    """The held-out files' examples, then the training config's held-out split, up to ``max_items``."""
    items = [i for path in step.heldout for i in load_jsonl(path) if isinstance(i, Example)]
    if step.heldout_split is not None:
        items += [i for i in split_of(step.heldout_split).heldout if isinstance(i, Example)]
    return items[: step.max_items]


def exact_match(
    model: NativeLlama, model_dir: Path, task_name: str | None, items: list[Example], adapter: LoraAdapter | None = None
) -> float | None:
    """Greedy answers of ``model`` (with ``adapter`` served unmerged, if given) scored by the task's scorer."""
    if not items or task_name is None:
        return None
    task = get_task(task_name)
    tokenizer = HFTokenizer(model_dir)
    rank = adapter.rank if adapter else 8
    config = EngineConfig(max_num_seqs=16, max_queue=len(items), max_loras=1, max_lora_rank=rank)
    engine = NativeEngine(model, tokenizer, eos_token_ids(model_dir, tokenizer), config)
    params = SamplingParams(max_tokens=48, temperature=0.0)

    async def one(i: int, item: Example) -> str:
        ids = tokenizer.apply_chat_template(item.messages)
        request = GenerationRequest(f"g{i}", ids, params, adapter=adapter.name if adapter else None)
        return "".join([o.text async for o in engine.generate(request)])

    async def run() -> list[str]:
        await engine.start()
        try:
            if adapter is not None:
                await engine.load_adapter(adapter.name, adapter.path)
            return await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        finally:
            await engine.stop()

    answers = asyncio.run(run())
    return sum(task.score(a, i.completion) for a, i in zip(answers, items, strict=True)) / len(items)


def score(
    model: NativeLlama,
    model_dir: Path,
    text_ids: list[int],
    task_name: str | None,
    items: list[Example],
    adapter: LoraAdapter | None = None,
) -> dict:
    """Perplexity on ``text_ids`` and exact match on ``items`` (with ``adapter`` applied unmerged, if given)."""
    return {
        "perplexity": perplexity(model, text_ids, lora=lora_for(model, adapter) if adapter else None),
        "exact_match": exact_match(model, model_dir, task_name, items, adapter),
    }  # fmt: skip


def evaluate_state(state: dict[str, torch.Tensor], model_dir: Path, dtype: str, inputs: GateInputs) -> dict:
    """Perplexity and exact match of the model in ``state`` on the gate's inputs (its adapter applied
    unmerged, if it names one), in ``dtype`` (``auto``: what the engine would pick)."""
    cpu = torch.device("cpu")
    quantized = any(k.endswith(".qweight") for k in state)
    model = NativeLlama(ModelShape.from_dir(model_dir), state, cpu, pick_dtype(dtype, cpu, quantized=quantized))
    return {
        **score(model, model_dir, inputs.text_ids, inputs.task, inputs.items, inputs.adapter),
        "items": len(inputs.items),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


@dataclass(frozen=True)
class GateInputs:
    """What a gate scores both models on, read once: the text's token ids, the task items, the adapter."""

    text_ids: list[int]
    task: str | None
    items: list[Example]
    adapter: LoraAdapter | None

    @classmethod
    def read(cls, step: GateStep, model_dir: Path) -> GateInputs:
        adapter = None
        if step.adapter is not None:
            adapter = load_peft_adapter(step.adapter.name, step.adapter, ModelShape.from_dir(model_dir), MAX_MERGE_RANK)
        text_ids = HFTokenizer(model_dir).encode(step.text.read_text(encoding="utf-8"))
        return cls(text_ids, task_of(step), gate_items(step), adapter)


def gate_verdict(step: GateStep, reference: dict, current: dict) -> list[str]:
    """Reasons the gate fails (empty: passed)."""
    breaches = []
    limit = reference["perplexity"] * (1 + step.max_perplexity_increase)
    if current["perplexity"] > limit:
        breaches.append(
            f"perplexity {current['perplexity']:.3f} > {limit:.3f} (reference {reference['perplexity']:.3f} "
            f"+{step.max_perplexity_increase:.0%})"
        )
    if reference["exact_match"] is not None and current["exact_match"] is not None:
        drop = reference["exact_match"] - current["exact_match"]
        if drop > step.max_exact_match_drop:
            breaches.append(f"exact match dropped {drop:.3f} > {step.max_exact_match_drop:.3f}")
    return breaches


def run_gate(
    step: GateStep, reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor], model_dir: Path, dtype: str
) -> dict:
    """Score both models on the same items; the manifest's record of the gate."""
    inputs = GateInputs.read(step, model_dir)
    ref_metrics = evaluate_state(reference, model_dir, dtype, inputs)
    cur_metrics = evaluate_state(state, model_dir, dtype, inputs)
    failed = gate_verdict(step, ref_metrics, cur_metrics)
    return {"reference": ref_metrics, "measured": cur_metrics, "passed": not failed, "breaches": failed}
