"""``ftserve optimize optimize/<recipe>.yaml``: run the steps, gate on quality, write the manifest.

The model moves through the steps as a state dict. ``merge`` folds an adapter in (the result becomes the
reference for the gate), ``quantize`` converts the decoder's linears, ``gate`` scores the current model
and the reference on the native engine and compares, ``export`` writes an engine's folder. Everything is
built in a staging folder; a recipe whose gates all pass replaces ``<output_dir>/<name>``, one that breaches
a gate goes to ``<output_dir>/<name>.rejected`` with ``ready: false`` and never touches a ready artifact.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ftserve.atomic import swap_dir
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids, pick_dtype
from ftserve.engine.lora import LoraAdapter, load_peft_adapter
from ftserve.engine.model import ModelShape, NativeLlama, read_state
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.models import ModelStore, sha256_file
from ftserve.optimize.export import check_export, export
from ftserve.optimize.merge import MAX_MERGE_RANK, merge_adapter
from ftserve.optimize.quality import lora_for, perplexity
from ftserve.optimize.quantize import get_quantizer
from ftserve.optimize.recipe import ExportStep, GateStep, MergeStep, QuantizeStep, Recipe
from ftserve.train.formats import DataError, Example, load_jsonl
from ftserve.train.pipeline import split_data
from ftserve.train.replay import load_replay
from ftserve.train.settings import load_train_config
from ftserve.train.tasks import get_task

log = logging.getLogger("ftserve.optimize")


class GateFailed(RuntimeError):
    """A quality gate was breached; the manifest says which and by how much."""


def state_mb(state: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def preflight(recipe: Recipe, state: dict[str, torch.Tensor]) -> None:
    """Every input exists and every setting fits the model, before any heavy work."""
    quant = None
    for step in recipe.steps:
        if isinstance(step, MergeStep):
            _check_adapter("merge", step.adapter)
        elif isinstance(step, QuantizeStep):
            quant = _check_quantize(step, state)
        elif isinstance(step, GateStep):
            _check_gate(step)
        else:
            check_export(step, quant)


def _check_adapter(what: str, adapter: Path) -> None:
    if not (adapter / "adapter_model.safetensors").is_file():
        raise DataError(f"{what}: adapter {str(adapter)!r} has no adapter_model.safetensors")


def _check_quantize(step: QuantizeStep, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    quantizer = get_quantizer(step.method, group_size=step.group_size, sym=step.sym)
    quantizer.check(state)
    if quantizer.needs_calibration and not step.calibration:
        raise DataError(f"quantize {step.method}: needs calibration data (calibration: [files])")
    for path in step.calibration:
        if not path.is_file():
            raise DataError(f"quantize {step.method}: calibration data {str(path)!r} is missing")
    return quantizer.config()


def _check_gate(step: GateStep) -> None:
    for path in (step.text, *step.heldout, step.heldout_split):
        if path is not None and not path.is_file():
            raise DataError(f"gate: {str(path)!r} does not exist")
    if step.adapter is not None:
        _check_adapter("gate", step.adapter)
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
        items += [i for i in split_data(load_train_config(step.heldout_split)).heldout if isinstance(i, Example)]
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


def evaluate_state(
    state: dict[str, torch.Tensor], model_dir: Path, step: GateStep, dtype: str, items: list[Example]
) -> dict:
    """Perplexity on the gate's text and exact match on ``items`` of the model in ``state`` (with the gate's
    adapter applied unmerged, if it names one), in ``dtype`` (``auto``: what the engine would pick)."""
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    cpu = torch.device("cpu")
    model = NativeLlama(shape, state, cpu, pick_dtype(dtype, cpu, quantized=any(k.endswith(".qweight") for k in state)))
    ids = HFTokenizer(model_dir).encode(step.text.read_text(encoding="utf-8"))
    adapter = None
    if step.adapter is not None:
        adapter = load_peft_adapter(step.adapter.name, step.adapter, shape, MAX_MERGE_RANK)
    return {
        "perplexity": perplexity(model, ids, lora=lora_for(model, adapter) if adapter else None),
        "exact_match": exact_match(model, model_dir, task_of(step), items, adapter),
        "items": len(items),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


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


def run_recipe(recipe: Recipe, store: ModelStore) -> dict[str, Any]:
    """Run every step; returns the manifest. Raises :class:`GateFailed` after writing a rejected output."""
    model_dir = store.pull(recipe.base)
    state = read_state(model_dir)
    preflight(recipe, state)
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    staging = recipe.output_dir / f".{recipe.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = sorted(model_dir.glob("*.safetensors"))
    manifest: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"),
        "base": {"ref": recipe.base, "weights_sha256": sha256_file(weights[0]) if len(weights) == 1 else None},
        "inputs": {},
        "steps": [],
    }
    reference, quant, breaches = state, None, []
    for step in tqdm(recipe.steps, desc=f"optimize {recipe.name}", unit="step"):
        started = time.monotonic()
        record: dict[str, Any] = {"settings": step.model_dump(mode="json")}
        if isinstance(step, MergeStep):
            manifest["inputs"][str(step.adapter)] = sha256_file(step.adapter / "adapter_model.safetensors")
            state = reference = merge_adapter(state, model_dir, step.adapter)
        elif isinstance(step, QuantizeStep):
            quantizer = get_quantizer(step.method, group_size=step.group_size, sym=step.sym)
            calibration = None
            if quantizer.needs_calibration:
                shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
                calibration = (shape, calibration_sequences(step, HFTokenizer(model_dir)))
            state = quantizer.convert(state, quantizer.prepare(state, calibration))
            quant = quantizer.config()
        elif isinstance(step, GateStep):
            for path in (step.text, *step.heldout, step.heldout_split, step.adapter):
                if path is not None:
                    manifest["inputs"][str(path)] = sha256_file(_weights_file(path))
            items = gate_items(step)
            ref_metrics = evaluate_state(reference, model_dir, step, recipe.dtype, items)
            cur_metrics = evaluate_state(state, model_dir, step, recipe.dtype, items)
            failed = gate_verdict(step, ref_metrics, cur_metrics)
            breaches += failed
            record |= {"reference": ref_metrics, "measured": cur_metrics, "passed": not failed, "breaches": failed}
        elif isinstance(step, ExportStep):
            record |= export(step, staging, model_dir, state, quant, recipe)
        record |= {"seconds": round(time.monotonic() - started, 2), "size_mb": round(state_mb(state), 1)}
        manifest["steps"].append(record)
        log.info("step %s done in %.1fs", step.step, record["seconds"])
    manifest["ready"] = not breaches
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    target = recipe.out if not breaches else recipe.out.with_name(f"{recipe.name}.rejected")
    swap_dir(staging, target)
    if breaches:
        raise GateFailed(f"recipe {recipe.name}: gate breached ({'; '.join(breaches)}); report in {target}")
    return manifest


def _weights_file(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path


def _calibration_sources(path: Path, tokenizer: HFTokenizer) -> list[list[list[int]]]:
    """Token id sequences of one calibration entry, as one or more sources to draw from evenly.

    A training config (``adapters/<name>.yaml``) gives its train split (never the held-out side the gate
    scores) and its replay text; a JSONL file gives replay text as is or task examples through the chat
    template.
    """
    if path.suffix in (".yaml", ".yml"):
        config = load_train_config(path)
        sources = [_encode_examples(split_data(config).train, tokenizer)]
        if config.replay is not None:
            sources.append([tokenizer.encode(text) for text in load_replay(config.replay.file)])
        return sources
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "{}")
    if set(json.loads(first)) == {"text"}:
        return [[tokenizer.encode(text) for text in load_replay(path)]]
    return [_encode_examples(load_jsonl(path), tokenizer)]


def _encode_examples(items: list, tokenizer: HFTokenizer) -> list[list[int]]:
    examples = [i for i in items if isinstance(i, Example)]
    return [tokenizer.apply_chat_template(i.messages) + tokenizer.encode(i.completion) for i in examples]


def calibration_sequences(step: QuantizeStep, tokenizer: HFTokenizer) -> list[list[int]]:
    """``calibration_items`` sequences taken in turn from the sources, each read at an even stride (a short
    source gives what it has and the others fill in)."""
    sources = [(path, src) for path in step.calibration for src in _calibration_sources(path, tokenizer)]
    per_source = -(-step.calibration_items // len(sources))
    picks = []
    for path, found in sources:
        if not found:
            raise DataError(f"quantize {step.method}: {path} has no usable calibration records")
        picks.append([ids[: step.calibration_max_tokens] for ids in found[:: max(1, len(found) // per_source)]])
    in_turn = [seq for group in itertools.zip_longest(*picks) for seq in group if seq is not None]
    return in_turn[: step.calibration_items]
