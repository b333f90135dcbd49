"""``ftserve bench optimize``: one fine-tuned model in every form the optimize stage makes, in one run.

Variants (one JSON row each, all built first, then measured on the same cores):

- ``fp32`` / ``bf16``: the base model with the adapter applied unmerged (LoRA), as the service runs it
  without the optimize stage;
- ``merged``: the adapter folded into the weights;
- ``int8`` / ``int4`` / ``gptq``: merged, then weight-only quantized: INT8 per channel, INT4 round-to-
  nearest, and GPTQ 4-bit at the same group size and grid, calibrated on the adapter's train split and
  replay text (never the held-out side); each with the quantize step's default per-row INT8 LM head.

``merged`` and the quantized variants run in the dtype ``engine.dtype: auto`` picks for them (float32 for
dense weights on a CPU without native bf16, bf16 activations for the packed INT8/INT4 kernels); each row
says which.

Each row: ``size_mb`` (weights in memory, the adapter included), ``perplexity`` on held-out general text,
``exact_match`` on the task's held-out data (the hand-written file and the training config's held-out
split, as the quality gate scores it), ``tokens_per_s_b1`` (one greedy stream: the median of
``b1_repeats`` runs, taken round by round over the variants, as one run lasts only seconds and a shared
VM's hiccups move it by 25%) and ``tokens_per_s_b16`` (16 at once), each request making exactly
``max_new_tokens`` tokens, EOS ignored. The summary gives every row against ``bf16`` and ``fp32``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ftserve.bench.engine_bench import measure_engine, warm_up, write_rows
from ftserve.bench.variants import OptimizeBenchConfig, VariantName
from ftserve.bench.workloads import Scenario, build_scenario
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids, pick_dtype, set_threads
from ftserve.engine.lora import LoraAdapter
from ftserve.engine.model import ModelShape, NativeLlama, read_state
from ftserve.engine.native import NativeEngine
from ftserve.optimize.gate import GateInputs, score
from ftserve.optimize.merge import merge_adapter
from ftserve.optimize.recipe import GateStep, QuantizeStep
from ftserve.optimize.runner import quantize

log = logging.getLogger(__name__)

UNMERGED = ("fp32", "bf16")
BATCH = 16  # concurrent requests of tokens_per_s_b16
Row = dict[str, Any]


def memory_mb(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """What the model holds: floating tensors in the compute dtype, quantized (integer) ones as stored."""
    sizes = (t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in weights.values())
    return sum(sizes) / 2**20


def build_variant(
    name: VariantName, config: OptimizeBenchConfig, model_dir: Path, state: dict, merged: dict
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The weights and compute dtype of one variant; unmerged variants return the base weights. ``merged`` and
    the quantized variants run in the dtype the engine picks for them (``engine.dtype: auto``)."""
    if name in UNMERGED:
        return state, torch.float32 if name == "fp32" else torch.bfloat16
    cpu = torch.device("cpu")
    if name == "merged":
        return merged, pick_dtype("auto", cpu)
    four_bit = name != "int8"
    step = QuantizeStep(
        step="quantize", method=name, group_size=config.group_size if four_bit else None,
        sym=config.int4_grid == "symmetric", clip_search=name == "gptq" and config.clip_search,
        act_order=name == "gptq" and config.act_order, damp=config.damp if name == "gptq" else None,
        calibration=[config.train_config],
        calibration_items=config.calibration_items,
    )  # fmt: skip
    quantized, _ = quantize(step, merged, model_dir)
    return quantized, pick_dtype("auto", cpu, quantized=True)


@dataclass
class Variant:
    """One variant, built and loaded: the model and what its row says about it."""

    name: VariantName
    model: NativeLlama
    adapter: LoraAdapter | None  # applied unmerged (the fp32 / bf16 rows)
    size_mb: float
    build_s: float


def build_model(
    name: VariantName, config: OptimizeBenchConfig, model_dir: Path, base: dict, merged: dict, heldout: GateInputs
) -> Variant:
    started = time.monotonic()
    weights, dtype = build_variant(name, config, model_dir, base, merged)
    built_s = time.monotonic() - started
    model = NativeLlama(ModelShape.from_dir(model_dir), weights, torch.device("cpu"), dtype)
    adapter = heldout.adapter if name in UNMERGED else None
    size = memory_mb(weights, dtype)
    if adapter is not None:
        size += (config.adapter / "adapter_model.safetensors").stat().st_size / 2**20
    return Variant(name, model, adapter, round(size, 1), round(built_s, 1))


async def speeds(
    variants: list[Variant], model_dir: Path, config: OptimizeBenchConfig
) -> dict[str, tuple[float, float]]:
    """Output tokens/s of one stream (median of ``b1_repeats``) and of ``BATCH`` concurrent streams, per variant.

    Every variant's engine runs side by side, idle but for its turn, and the single streams go round by round
    over the variants: a slow minute on a shared VM then hits every variant alike instead of all the repeats
    of one (single streams here drift by 25% over minutes)."""
    tokenizer = HFTokenizer(model_dir)
    scenarios = [
        build_scenario(name, tokenizer, requests=requests, max_new_tokens=config.max_new_tokens)
        for name, requests in (("single", 1), ("concurrent32", BATCH))
    ]
    longest = max(len(tokenizer.apply_chat_template(r.messages)) for s in scenarios for r in s.requests)
    eos = eos_token_ids(model_dir, tokenizer)
    engines: dict[str, NativeEngine] = {}
    try:
        for v in variants:
            rank = v.adapter.rank if v.adapter else 8
            engine_config = EngineConfig(
                max_num_seqs=BATCH, max_loras=1, max_lora_rank=rank,
                kv_cache_tokens=BATCH * (longest + config.max_new_tokens + 16),  # what the runs need, no more
            )  # fmt: skip
            engine = engines[v.name] = NativeEngine(v.model, tokenizer, eos, engine_config)
            await engine.start()
            if v.adapter is not None:
                await engine.load_adapter(v.adapter.name, v.adapter.path)
            await warm_up(engine)

        def run(v: Variant, scenario: Scenario) -> Scenario:
            specs = [dataclasses.replace(r, adapter=v.adapter.name if v.adapter else None) for r in scenario.requests]
            return dataclasses.replace(scenario, requests=specs)

        async def rate(v: Variant, scenario: Scenario) -> float:
            m = await measure_engine(engines[v.name], run(v, scenario))
            return m.output_tokens / m.wall_s

        single: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in tqdm(range(config.b1_repeats), desc="batch 1, every variant in turn", unit="round"):
            for v in variants:
                single[v.name].append(await rate(v, scenarios[0]))
        return {
            v.name: (round(statistics.median(single[v.name]), 2), round(await rate(v, scenarios[1]), 2))
            for v in variants
        }
    finally:
        for engine in engines.values():
            await engine.stop()


def measure_row(v: Variant, speed: tuple[float, float], model_dir: Path, heldout: GateInputs) -> Row:
    quality = score(v.model, model_dir, heldout.text_ids, heldout.task, heldout.items, v.adapter)
    return {
        "variant": v.name,
        "dtype": str(v.model.dtype).removeprefix("torch."),
        "adapter": "lora" if v.adapter is not None else "merged",
        "size_mb": v.size_mb,
        "perplexity": round(quality["perplexity"], 4),
        "exact_match": quality["exact_match"],
        "exact_match_items": len(heldout.items),
        "tokens_per_s_b1": speed[0],
        "tokens_per_s_b16": speed[1],
        "build_s": v.build_s,
    }


def read_heldout(config: OptimizeBenchConfig, model_dir: Path) -> GateInputs:
    """What every variant is scored on, read once per run (the adapter is applied to the unmerged rows)."""
    gate = GateStep(step="gate", text=config.text, heldout=config.heldout, heldout_split=config.train_config,
                    adapter=config.adapter, max_items=config.max_items)  # fmt: skip
    return GateInputs.read(gate, model_dir)


def run_optimize_bench(config: OptimizeBenchConfig, model_dir: Path, json_path: Path) -> list[Row]:
    """Measure every variant, writing the rows after each; print the comparison with bf16 to stderr."""
    threads = set_threads(None)
    log.info("bench optimize: %s with %s on %s (%d threads)", config.variants, config.adapter, model_dir.name, threads)
    base = read_state(model_dir)
    merged = merge_adapter(base, model_dir, config.adapter)
    heldout = read_heldout(config, model_dir)
    variants = [
        build_model(name, config, model_dir, base, merged, heldout)
        for name in tqdm(config.variants, desc="build variants", unit="variant")
    ]
    measured = asyncio.run(speeds(variants, model_dir, config))
    rows: list[Row] = []
    for v in tqdm(variants, desc="quality", unit="variant"):
        rows.append(measure_row(v, measured[v.name], model_dir, heldout))
        write_rows(json_path, rows)
        log.info("%s: %s", v.name, rows[-1])
    print(summary(rows), file=sys.stderr)
    return rows


def summary(rows: Sequence[Row]) -> str:
    """One line per variant: its figures, and speed and perplexity as ratios to the bf16 and fp32 rows."""
    refs = {name: next((r for r in rows if r["variant"] == name), None) for name in ("bf16", "fp32")}
    keys = (("perplexity", "ppl"), ("tokens_per_s_b1", "b1"), ("tokens_per_s_b16", "b16"))
    head = ["variant", "dtype", "size MB", "exact match", *(label for _, label in keys)]
    head += [f"{label}/{ref}" for ref in refs for _, label in keys]
    lines = [head]
    for r in rows:
        cells = [r["variant"], r["dtype"], f"{r['size_mb']:.0f}", "-" if r["exact_match"] is None else
                 f"{r['exact_match']:.3f}", *(f"{r[key]:.2f}" for key, _ in keys)]  # fmt: skip
        for ref in refs.values():
            cells += [f"{r[key] / ref[key]:.3f}" if ref and ref.get(key) else "-" for key, _ in keys]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
