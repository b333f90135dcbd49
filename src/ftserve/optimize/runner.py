"""``ftserve optimize optimize/<recipe>.yaml``: run the steps, gate on quality, write the manifest.

The model moves through the steps as a state dict. ``merge`` folds an adapter in (the result becomes the
reference for the gate), ``quantize`` converts the decoder's linears, ``gate`` scores the current model
and the reference on the native engine and compares, ``export`` writes an engine's folder. Everything is
built in a staging folder; a recipe whose gates all pass replaces ``<output_dir>/<name>``, one that breaches
a gate goes to ``<output_dir>/<name>.rejected`` with ``ready: false`` and never touches a ready artifact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.model import ModelShape, NativeLlama, read_state
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.models import ModelStore, sha256_file
from ftserve.optimize.merge import merge_adapter, write_model
from ftserve.optimize.quality import perplexity
from ftserve.optimize.quantize import QuantizeError, get_quantizer
from ftserve.optimize.recipe import ExportStep, GateStep, MergeStep, QuantizeStep, Recipe
from ftserve.train.formats import DataError, Example, load_jsonl
from ftserve.train.tasks import get_task

log = logging.getLogger("ftserve.optimize")


class GateFailed(RuntimeError):
    """A quality gate was breached; the manifest says which and by how much."""


def state_mb(state: dict[str, torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def preflight(recipe: Recipe, state: dict[str, torch.Tensor]) -> None:
    """Every input exists and every setting fits the model, before any heavy work."""
    for step in recipe.steps:
        if isinstance(step, MergeStep) and not (step.adapter / "adapter_model.safetensors").is_file():
            raise DataError(f"merge: adapter {str(step.adapter)!r} has no adapter_model.safetensors")
        if isinstance(step, QuantizeStep):
            quantizer = get_quantizer(step.method, **({"group_size": step.group_size} if step.group_size else {}))
            quantizer.check(state)
            if quantizer.needs_calibration and (step.calibration is None or not step.calibration.is_file()):
                raise DataError(f"quantize {step.method}: calibration data {step.calibration!s} is missing")
        if isinstance(step, GateStep):
            for path in (step.text, step.heldout):
                if path is not None and not path.is_file():
                    raise DataError(f"gate: {str(path)!r} does not exist")
            if step.task:
                get_task(step.task)


def _exact_match(model: NativeLlama, model_dir: Path, step: GateStep) -> float | None:
    if step.heldout is None or step.task is None:
        return None
    task = get_task(step.task)
    items = [i for i in load_jsonl(step.heldout) if isinstance(i, Example)][: step.max_items]
    tokenizer = HFTokenizer(model_dir)
    engine = NativeEngine(model, tokenizer, eos_token_ids(model_dir, tokenizer), EngineConfig(max_num_seqs=16))
    params = SamplingParams(max_tokens=48, temperature=0.0)

    async def one(i: int, item: Example) -> str:
        ids = tokenizer.apply_chat_template(item.messages)
        return "".join([o.text async for o in engine.generate(GenerationRequest(f"g{i}", ids, params))])

    async def run() -> list[str]:
        await engine.start()
        try:
            return await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        finally:
            await engine.stop()

    answers = asyncio.run(run())
    return sum(task.score(a, i.completion) for a, i in zip(answers, items, strict=True)) / max(1, len(items))


def evaluate_state(state: dict[str, torch.Tensor], model_dir: Path, step: GateStep, dtype: torch.dtype) -> dict:
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    model = NativeLlama(shape, state, torch.device("cpu"), dtype)
    ids = HFTokenizer(model_dir).encode(step.text.read_text(encoding="utf-8"))
    return {"perplexity": perplexity(model, ids), "exact_match": _exact_match(model, model_dir, step)}


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


TRTLLM_NOTE = (
    "Not built here: the tensorrt-llm package cannot be installed on these machines (its PyPI entry is a stub "
    "that downloads from NVIDIA's index). Run these commands where it is installed, with a GPU."
)


def export(step: ExportStep, staging: Path, model_dir: Path, state: dict, quant: dict | None, recipe: Recipe) -> dict:
    """Write one engine's folder under ``staging/<format>``; returns what the manifest records."""
    out = staging / step.format
    if step.format == "native":
        write_model(out, model_dir, state, {"quantization_config": quant} if quant else None)
        return {"path": step.format, "load_with": f"bentos/*.yaml: model: {recipe.out / step.format}"}
    if quant is not None:
        raise QuantizeError(
            f"export {step.format}: a {quant['method']} state has no {step.format} layout yet; "
            "export the unquantized (or merged) model, or use format: native"
        )
    write_model(out, model_dir, state)
    if step.format == "vllm":
        return {"path": step.format, "load_with": f"vllm serve {recipe.out / step.format}"}
    ckpt = recipe.out / "trtllm-checkpoint"
    commands = [
        f"python convert_checkpoint.py --model_dir {recipe.out / step.format} --output_dir {ckpt} --dtype bfloat16",
        f"trtllm-build --checkpoint_dir {ckpt} --output_dir {recipe.out / 'trtllm-engine'} --gemm_plugin auto",
    ]
    script = "\n".join(commands)
    (out / "BUILD.md").write_text(f"# TensorRT-LLM build\n\n{TRTLLM_NOTE}\n\n```bash\n{script}\n```\n")
    return {"path": step.format, "built": False, "note": TRTLLM_NOTE, "commands": commands}


def _publish(staging: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.previous")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run_recipe(recipe: Recipe, store: ModelStore) -> dict[str, Any]:
    """Run every step; returns the manifest. Raises :class:`GateFailed` after writing a rejected output."""
    model_dir = store.pull(recipe.base)
    state = read_state(model_dir)
    preflight(recipe, state)
    dtype = torch.bfloat16 if recipe.dtype == "bfloat16" else torch.float32
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
            quantizer = get_quantizer(step.method, **({"group_size": step.group_size} if step.group_size else {}))
            calibration = (model_dir, _calibration(step)) if quantizer.needs_calibration else None
            state = quantizer.convert(state, quantizer.prepare(state, calibration))
            quant = quantizer.config()
        elif isinstance(step, GateStep):
            for path in (step.text, step.heldout):
                if path is not None:
                    manifest["inputs"][str(path)] = sha256_file(path)
            ref_metrics = evaluate_state(reference, model_dir, step, dtype)
            cur_metrics = evaluate_state(state, model_dir, step, dtype)
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
    _publish(staging, target)
    if breaches:
        raise GateFailed(f"recipe {recipe.name}: gate breached ({'; '.join(breaches)}); report in {target}")
    return manifest


def _calibration(step: QuantizeStep) -> list[str]:
    if step.calibration is None:
        raise DataError(f"quantize {step.method}: needs calibration data")
    items = load_jsonl(step.calibration)[: step.calibration_items]
    return ["\n".join(content for _, content in item.prompt) + "\n" + item.completion for item in items]
