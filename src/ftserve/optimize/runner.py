"""``ftserve optimize optimize/<recipe>.yaml``: run the steps, gate on quality, write the manifest.

The model moves through the steps as a state dict. ``merge`` folds an adapter in (the result becomes the
reference for the gate), ``quantize`` converts the decoder's linears, ``gate`` scores the current model
and the reference on the native engine and compares, ``export`` writes an engine's folder. Everything is
built in a staging folder; a recipe whose gates all pass replaces ``<output_dir>/<name>``, one that breaches
a gate goes to ``<output_dir>/<name>.rejected`` with ``ready: false`` and never touches a ready artifact.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ftserve.atomic import swap_dir
from ftserve.engine.loader import HFTokenizer
from ftserve.engine.model import ModelShape, read_state
from ftserve.models import ModelStore, sha256_file
from ftserve.optimize.calibration import calibration_sequences
from ftserve.optimize.export import check_export, export
from ftserve.optimize.gate import check_gate, run_gate
from ftserve.optimize.merge import check_adapter, merge_adapter
from ftserve.optimize.quantize import Quantizer, get_quantizer, quantize_head
from ftserve.optimize.recipe import ExportStep, GateStep, MergeStep, QuantizeStep, Recipe
from ftserve.train.formats import DataError

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
            check_adapter("merge", step.adapter)
        elif isinstance(step, QuantizeStep):
            quant = _check_quantize(step, state)
        elif isinstance(step, GateStep):
            check_gate(step)
        else:
            check_export(step, quant)


def quantizer_for(step: QuantizeStep) -> Quantizer:
    """The step's quantizer; a setting the method does not take (act_order for int8, say) is refused."""
    optional = {"clip_search": step.clip_search, "act_order": step.act_order, "damp": step.damp}
    return get_quantizer(
        step.method, group_size=step.group_size, sym=step.sym, **{k: v for k, v in optional.items() if v}
    )


def quant_config(step: QuantizeStep, quantizer: Quantizer) -> dict[str, Any]:
    """The ``quantization_config`` of the step's output: the method's, and how the head is stored."""
    config = quantizer.config() | {"lm_head": step.head}
    if step.head == "int8":
        config["modules_not_converted"] = [m for m in config["modules_not_converted"] if m != "lm_head"]
    return config


def _check_quantize(step: QuantizeStep, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    quantizer = quantizer_for(step)
    quantizer.check(state)
    if quantizer.needs_calibration and not step.calibration:
        raise DataError(f"quantize {step.method}: needs calibration data (calibration: [files])")
    for path in step.calibration:
        if not path.is_file():
            raise DataError(f"quantize {step.method}: calibration data {str(path)!r} is missing")
    return quant_config(step, quantizer)


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
            state, quant = quantize(step, state, model_dir)
        elif isinstance(step, GateStep):
            manifest["inputs"] |= {str(p): sha256_file(_weights_file(p)) for p in step.inputs()}
            record |= run_gate(step, reference, state, model_dir, recipe.dtype)
            breaches += record["breaches"]
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


def quantize(step: QuantizeStep, state: dict[str, torch.Tensor], model_dir: Path) -> tuple[dict, dict[str, Any]]:
    """The quantized state and its ``quantization_config``."""
    quantizer = quantizer_for(step)
    quantizer.check(state)
    calibration = None
    if quantizer.needs_calibration:
        shape = ModelShape.from_dir(model_dir)
        calibration = (shape, calibration_sequences(step, HFTokenizer(model_dir)))
    quantized = quantizer.convert(state, quantizer.prepare(state, calibration))
    if step.head == "int8":
        quantized = quantize_head(quantized)
    return quantized, quant_config(step, quantizer)


def _weights_file(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path
