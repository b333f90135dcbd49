"""Multi-LoRA in the native engine: mixed batches equal PEFT run alone; bad adapters are refused."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ftserve.bench.adapters import make_random_adapters
from ftserve.config import EngineConfig
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.lora import AdapterError, resolve_adapter_dir
from ftserve.engine.model import NativeLlama
from ftserve.engine.native import NativeEngine
from ftserve.engine.request import AdapterNotFoundError, GenerationOutput, GenerationRequest, SamplingParams
from tests.engine.conftest import hf_greedy

NAMES = ["lora-a", "lora-b", "lora-c"]  # ranks 4, 8, 16; lora-c also targets o_proj


@pytest.fixture(scope="module")
def adapter_root(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for folder in make_random_adapters(model_dir, root, NAMES, seed=3).values():
        # Strong updates, so every adapter visibly changes greedy tokens and a skipped delta cannot pass.
        weights = load_file(str(folder / "adapter_model.safetensors"))
        weights = {k: v * 40 if ".lora_B." in k else v for k, v in weights.items()}
        save_file(weights, str(folder / "adapter_model.safetensors"))
    return root


def build(model_dir: Path, native: NativeLlama, **overrides: object) -> NativeEngine:
    tokenizer = HFTokenizer(model_dir)
    config = EngineConfig.model_validate({"dtype": "float32", "max_num_seqs": 8, **overrides})
    return NativeEngine(native, tokenizer, eos_token_ids(model_dir, tokenizer), config)


def run(engine: NativeEngine, adapter_root: Path, reqs: list[GenerationRequest]) -> list[list[GenerationOutput]]:
    async def collect(req: GenerationRequest) -> list[GenerationOutput]:
        return [out async for out in engine.generate(req)]

    async def main() -> list[list[GenerationOutput]]:
        await engine.start()
        try:
            for name in NAMES:
                await engine.load_adapter(name, resolve_adapter_dir(name, [adapter_root]))
            return await asyncio.gather(*(collect(r) for r in reqs))
        finally:
            await engine.stop()

    return asyncio.run(main())


def peft_greedy(model_dir: Path, adapter: Path, prompt: list[int], n: int, eos: frozenset[int]) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return hf_greedy(PeftModel.from_pretrained(base, str(adapter)).eval(), prompt, n, eos)


@pytest.mark.parametrize("max_loras", [3, 1], ids=["all-resident", "one-slot-evicting"])
def test_mixed_adapter_batch_matches_peft_alone(
    model_dir: Path, native_model: NativeLlama, hf_model: torch.nn.Module, adapter_root: Path, max_loras: int
) -> None:
    engine = build(model_dir, native_model, max_loras=max_loras)
    texts = ["Where is my parcel?", "Summarize: the meeting moved to Friday at noon.", "Hi", "Name a colour."]
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    plan = [(prompts[0], "lora-a"), (prompts[1], "lora-b"), (prompts[2], None), (prompts[3], "lora-c"),
            (prompts[1], "lora-c")]  # fmt: skip
    reqs = [
        GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0), a) for i, (p, a) in enumerate(plan)
    ]
    results = run(engine, adapter_root, reqs)
    for (prompt, adapter), outs in zip(plan, results, strict=True):
        got = [t for o in outs for t in o.token_ids]
        base = hf_greedy(hf_model, prompt, 6, engine._eos)
        if adapter is None:
            assert got == base
        else:
            want = peft_greedy(model_dir, adapter_root / adapter, prompt, 6, engine._eos)
            assert want != base, f"{adapter} does not change this prompt's tokens: the test would be blind"
            assert got == want, adapter
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_adapters_change_outputs(model_dir: Path, native_model: NativeLlama, adapter_root: Path) -> None:
    engine = build(model_dir, native_model)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}])
    params = SamplingParams(max_tokens=8, temperature=0)
    outs = run(
        engine, adapter_root, [GenerationRequest("b", prompt, params), GenerationRequest("a", prompt, params, "lora-c")]
    )
    assert [t for o in outs[0] for t in o.token_ids] != [t for o in outs[1] for t in o.token_ids]


@pytest.mark.parametrize("name", ["../etc", "/abs/path", "a/b", "..", ""])
def test_adapter_names_with_paths_are_refused(name: str, adapter_root: Path) -> None:
    with pytest.raises(AdapterError, match="invalid adapter name"):
        resolve_adapter_dir(name, [adapter_root])


def test_pickle_only_adapter_is_refused(
    model_dir: Path, native_model: NativeLlama, tmp_path: Path, adapter_root: Path
) -> None:
    bad = tmp_path / "pickled"
    shutil.copytree(adapter_root / "lora-a", bad)
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    engine = build(model_dir, native_model)
    with pytest.raises(AdapterError, match="pickle"):
        asyncio.run(engine.load_adapter("pickled", bad))
    assert engine.adapters() == []


def test_rank_above_the_limit_and_unknown_adapter_are_refused(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path
) -> None:
    engine = build(model_dir, native_model, max_lora_rank=8)
    with pytest.raises(AdapterError, match="rank 16"):
        asyncio.run(engine.load_adapter("lora-c", adapter_root / "lora-c"))
    asyncio.run(engine.load_adapter("lora-a", adapter_root / "lora-a"))
    assert engine.adapters() == ["lora-a"]

    async def unknown() -> None:
        await anext(engine.generate(GenerationRequest("x", [1, 2, 3], SamplingParams(), adapter="nope")))

    with pytest.raises(AdapterNotFoundError, match="lora-a"):
        asyncio.run(unknown())


def test_adapter_for_another_base_is_refused(tmp_path: Path, adapter_root: Path, native_model: NativeLlama) -> None:
    from dataclasses import replace

    from ftserve.engine.lora import load_peft_adapter

    other = replace(native_model.shape, hidden_size=native_model.shape.hidden_size * 2)
    with pytest.raises(AdapterError, match="do not fit the base model"):
        load_peft_adapter("lora-a", adapter_root / "lora-a", other, max_rank=64)


def test_idle_adapters_offload_to_disk_and_reload_on_use(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path
) -> None:
    prompt = HFTokenizer(model_dir).apply_chat_template([{"role": "user", "content": "Where is my parcel?"}])
    req = GenerationRequest("a", prompt, SamplingParams(max_tokens=6, temperature=0), "lora-a")
    roomy = build(model_dir, native_model)
    want = [t for o in run(roomy, adapter_root, [req])[0] for t in o.token_ids]

    tight = build(model_dir, native_model, max_cpu_loras=1)
    results = run(tight, adapter_root, [])  # loads lora-a, lora-b, lora-c in that order
    assert results == []
    assert [tight.loras.residency(n) for n in NAMES] == ["disk", "disk", "cpu"]
    got = [t for o in run(tight, adapter_root, [req])[0] for t in o.token_ids]
    assert got == want
    assert tight.loras.residency("lora-a") == "device"


def test_pinned_adapter_keeps_its_slot(model_dir: Path, native_model: NativeLlama, adapter_root: Path) -> None:
    engine = build(model_dir, native_model, max_loras=2)
    prompt = HFTokenizer(model_dir).apply_chat_template([{"role": "user", "content": "Hi"}])

    def ask(adapter: str) -> GenerationRequest:
        return GenerationRequest(adapter, prompt, SamplingParams(max_tokens=2, temperature=0), adapter)

    run(engine, adapter_root, [ask("lora-a"), ask("lora-b")])
    engine.loras.pin("lora-a")
    engine.loras.acquire({"lora-b"})  # lora-b most recently used: lora-a would be the LRU victim if not pinned
    run(engine, adapter_root, [ask("lora-c")])
    assert engine.loras.residency("lora-a") == "device"
    assert engine.loras.residency("lora-b") == "cpu"


def test_reloading_changed_weights_is_a_new_version(
    model_dir: Path, native_model: NativeLlama, adapter_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "lora-a"
    shutil.copytree(adapter_root / "lora-a", folder)
    engine = build(model_dir, native_model)
    first = asyncio.run(engine.load_adapter("lora-a", folder))
    engine.loras.acquire({"lora-a"})
    weights = load_file(str(folder / "adapter_model.safetensors"))
    save_file(
        {k: v * 2 if ".lora_B." in k else v for k, v in weights.items()}, str(folder / "adapter_model.safetensors")
    )
    second = asyncio.run(engine.load_adapter("lora-a", folder))
    assert second.version != first.version and second.namespace != first.namespace
    assert engine.loras.residency("lora-a") == "cpu"  # the old weights left their slot
