"""The native engine serves quantized checkpoints through the packed kernels, and they stay accurate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.lora import load_peft_adapter
from ftserve.engine.model import ModelShape, NativeLlama, read_state
from ftserve.engine.native import NativeEngine
from ftserve.engine.qlinear import Int4Linear, Int8Linear, dequantize_int4, dequantize_int8
from ftserve.engine.request import GenerationRequest, SamplingParams
from ftserve.optimize.merge import merge_adapter, write_model
from ftserve.optimize.quality import lora_for, perplexity, sequence_logits
from ftserve.optimize.quantize import get_quantizer, quantize_head

CPU = torch.device("cpu")
QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do bees make honey?", "Say hi."]


TEXT = (
    "Bread is one of the oldest prepared foods. Flour, water, salt and a little yeast are enough; time does "
    "the rest. As the dough rests, the yeast feeds on sugars in the flour and releases gas, which the stretchy "
    "gluten network traps in small pockets. Baking sets that structure and browns the crust."
)


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float checkpoint whose weights are exactly the quantized grid values."""
    out = {}
    for key, value in state.items():
        if key.endswith(".qweight"):
            base = key.removesuffix(".qweight")
            zeros = state.get(f"{base}.zeros")
            scales = state[f"{base}.scales"]
            w = dequantize_int8(value, scales) if zeros is None else dequantize_int4(value, scales, zeros)
            out[f"{base}.weight"] = w
        elif not key.endswith((".scales", ".zeros")):
            out[key] = value
    return out


@pytest.fixture(scope="module")
def folders(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    state = read_state(model_dir)
    out = {}
    for name, settings in (("int8", {}), ("int4", {"group_size": 64})):
        quantizer = get_quantizer(name, **settings)
        qstate = quantizer.convert(state, quantizer.prepare(state))
        write_model(root / name, model_dir, qstate, {"quantization_config": quantizer.config()})
        write_model(root / f"{name}-dequantized", model_dir, dequantized(qstate))
        out[name] = root / name
        out[f"{name}-dequantized"] = root / f"{name}-dequantized"
    return out


@pytest.mark.parametrize(("name", "kind"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_checkpoint_runs_the_packed_kernel_and_equals_its_dequantized_twin(
    folders: dict[str, Path], model_dir: Path, name: str, kind: type
) -> None:
    ids = HFTokenizer(model_dir).encode(TEXT)
    quant = NativeLlama.from_dir(folders[name], CPU, torch.float32)
    assert all(isinstance(getattr(layer, p), kind) for layer in quant.layers for p in ("qkv", "o", "gate_up", "down"))
    twin = NativeLlama.from_dir(folders[f"{name}-dequantized"], CPU, torch.float32)
    torch.testing.assert_close(sequence_logits(quant, ids), sequence_logits(twin, ids), atol=2e-3, rtol=1e-3)


def test_int8_keeps_perplexity_close_and_int4_costs_more(folders: dict[str, Path], model_dir: Path) -> None:
    ids = HFTokenizer(model_dir).encode(TEXT)
    ppl = {
        name: perplexity(NativeLlama.from_dir(path, CPU, torch.float32), ids)
        for name, path in (("dense", model_dir), ("int8", folders["int8"]), ("int4", folders["int4"]))
    }
    assert ppl["int8"] <= ppl["dense"] * 1.05, ppl
    assert ppl["int4"] > ppl["int8"], ppl


def test_an_int8_head_keeps_perplexity_within_half_a_percent(model_dir: Path) -> None:
    ids = HFTokenizer(model_dir).encode(TEXT)
    state, shape = read_state(model_dir), ModelShape.from_dir(model_dir)
    dense = NativeLlama(shape, state, CPU, torch.float32)
    int8_head = NativeLlama(shape, quantize_head(state), CPU, torch.float32)
    assert isinstance(int8_head.head, Int8Linear)
    assert perplexity(int8_head, ids) == pytest.approx(perplexity(dense, ids), rel=5e-3)
    assert not torch.equal(sequence_logits(int8_head, ids[:8]), sequence_logits(dense, ids[:8]))


def test_lora_scored_unmerged_equals_the_merged_model(model_dir: Path, tmp_path: Path) -> None:
    """Perplexity with an adapter applied as LoRA equals perplexity of the model it merges into (fp32)."""
    make_random_adapters(model_dir, tmp_path, ["r8"], seed=3)
    ids = HFTokenizer(model_dir).encode(TEXT)
    state = read_state(model_dir)
    base = NativeLlama(ModelShape.from_dir(model_dir), state, CPU, torch.float32)
    adapter = load_peft_adapter("r8", tmp_path / "r8", base.shape, 64)
    merged = NativeLlama(base.shape, merge_adapter(state, model_dir, tmp_path / "r8"), CPU, torch.float32)
    unmerged = perplexity(base, ids, lora=lora_for(base, adapter))
    assert unmerged == pytest.approx(perplexity(merged, ids), rel=1e-4)
    assert unmerged != pytest.approx(perplexity(base, ids), rel=1e-3)  # the adapter really changes the model


def test_a_quantized_base_serves_unmerged_adapters(folders: dict[str, Path], model_dir: Path, tmp_path: Path) -> None:
    """The INT8 base plus a LoRA adapter (served unmerged) gives the tokens of its dequantized twin plus it."""
    make_random_adapters(model_dir, tmp_path, ["r8"], seed=4)
    tokenizer = HFTokenizer(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]

    async def answers(folder: Path) -> list[list[int]]:
        model = NativeLlama.from_dir(folder, CPU, torch.float32)
        engine = NativeEngine(model, tokenizer, eos_token_ids(model_dir, tokenizer), EngineConfig(max_num_seqs=4))
        await engine.start()
        try:
            await engine.load_adapter("r8", tmp_path / "r8")
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            runs = [
                engine.generate(GenerationRequest(f"q{i}", ids, params, adapter="r8" if i % 2 == 0 else None))
                for i, ids in enumerate(prompts)
            ]
            return [[t for o in [o async for o in run] for t in o.token_ids] for run in runs]
        finally:
            await engine.stop()

    quantized = asyncio.run(answers(folders["int8"]))
    assert isinstance(NativeLlama.from_dir(folders["int8"], CPU, torch.float32).layers[0].qkv, Int8Linear)
    assert quantized == asyncio.run(answers(folders["int8-dequantized"]))
    assert all(len(tokens) == 12 for tokens in quantized)
