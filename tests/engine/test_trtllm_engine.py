"""The TensorRT-LLM backend's mapping of ftserve settings and requests onto TensorRT-LLM's LLM API.

TensorRT-LLM cannot be installed on these machines, so nothing here runs it. The pure mapping functions are
tested directly; the engine class runs against a stand-in ``tensorrt_llm`` package injected into
``sys.modules`` that implements the documented contract minimally (an ``LLM`` whose
``generate_async(..., streaming=True)`` returns a ``RequestOutput``-like object: its own async iterator,
updated in place, ``outputs[0].token_ids`` cumulative, ``abort()``). The unit under test is our mapping and
its use of that contract, not the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest

from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.library import BackendNotInstalledError, ExternalAdapter
from ftserve.engine.protocol import create_engine
from ftserve.engine.request import (
    EngineNotReadyError,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)
from ftserve.engine.trtllm_engine import (
    LibraryObject,
    TensorRTLLMEngine,
    finish_reason,
    lora_request_args,
    new_tokens,
    sampling_params,
    speculative_config,
)
from ftserve.engine.trtllm_engine import llm_kwargs as map_llm_kwargs
from tests.engine.fake_tensorrt_llm import Library

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "support-router"

# -- the pure mapping ---------------------------------------------------------------------------------------


def test_selecting_tensorrt_llm_without_it_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # not importable, whatever this interpreter has
    # An empty folder: the check comes before anything reads the model.
    with pytest.raises(
        BackendNotInstalledError, match=r"pip install tensorrt-llm --extra-index-url https://pypi\.nvidia\.com"
    ):
        create_engine(tmp_path, EngineConfig(backend="tensorrt-llm"))


def test_deployment_settings_become_llm_arguments(tmp_path: Path) -> None:
    config = EngineConfig(
        backend="tensorrt-llm", dtype="bfloat16", max_model_len=1024, max_num_seqs=12, max_num_batched_tokens=256,
        enable_prefix_caching=False, kv_cache_tokens=4096, max_loras=3, max_lora_rank=16, max_cpu_loras=2,
        tensorrt_llm={"tensor_parallel_size": 2, "kv_cache_free_gpu_memory_fraction": 0.5},
    )  # fmt: skip
    args = map_llm_kwargs(tmp_path, config, max_model_len=900)
    assert set(args) == {
        "model", "tokenizer", "backend", "tensor_parallel_size", "dtype", "max_batch_size", "max_num_tokens",
        "max_seq_len", "enable_chunked_prefill", "kv_cache_config", "lora_config",
    }  # fmt: skip
    assert args["model"] == args["tokenizer"] == str(tmp_path)
    assert args["backend"] == "pytorch" and args["tensor_parallel_size"] == 2 and args["dtype"] == "bfloat16"
    assert (args["max_batch_size"], args["max_num_tokens"], args["max_seq_len"]) == (12, 256, 900)
    assert args["enable_chunked_prefill"] is True  # prompts longer than max_num_tokens are prefilled in chunks
    assert args["kv_cache_config"] == LibraryObject(
        "tensorrt_llm.llmapi", "KvCacheConfig",
        {"free_gpu_memory_fraction": 0.5, "enable_block_reuse": False, "max_tokens": 4096},
    )  # fmt: skip
    lora = args["lora_config"]
    assert (lora.module, lora.name) == ("tensorrt_llm.lora_manager", "LoraConfig")
    assert lora.kwargs["lora_target_modules"] == [
        "attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h",
    ]  # fmt: skip
    assert (lora.kwargs["max_lora_rank"], lora.kwargs["max_loras"]) == (16, 3)
    assert lora.kwargs["max_cpu_loras"] == 3  # the host cache holds at least what the GPU holds
    few = map_llm_kwargs(tmp_path, EngineConfig(max_num_seqs=64, max_num_batched_tokens=16), max_model_len=64)
    assert few["max_num_tokens"] == 64  # one decode token per running sequence fits in a step
    assert "max_tokens" not in few["kv_cache_config"].kwargs  # unset: the memory fraction alone bounds it


def test_a_built_engine_runs_on_the_tensorrt_runtime_with_the_model_folders_tokenizer(tmp_path: Path) -> None:
    engine_dir = tmp_path / "trtllm-engine"
    engine_dir.mkdir()
    model_dir = tmp_path / "model"
    config = EngineConfig(tensorrt_llm={"runtime": "tensorrt", "engine_dir": str(engine_dir)})
    args = map_llm_kwargs(model_dir, config, max_model_len=2048)
    assert args["model"] == str(engine_dir) and args["tokenizer"] == str(model_dir)
    assert "backend" not in args  # the TensorRT engine class takes no backend
    building = map_llm_kwargs(model_dir, EngineConfig(tensorrt_llm={"runtime": "tensorrt"}), max_model_len=2048)
    assert building["model"] == str(model_dir)  # the LLM API builds the engine from the model folder
    with pytest.raises(ValueError, match="runtime: tensorrt"):
        map_llm_kwargs(model_dir, EngineConfig(tensorrt_llm={"engine_dir": str(engine_dir)}), max_model_len=2048)
    missing = EngineConfig(tensorrt_llm={"runtime": "tensorrt", "engine_dir": str(tmp_path / "not-built")})
    with pytest.raises(FileNotFoundError, match=r"not-built.*BUILD\.md"):
        map_llm_kwargs(model_dir, missing, max_model_len=2048)


def test_llm_args_override_and_extend_the_mapped_settings(tmp_path: Path) -> None:
    extra = {
        "max_batch_size": 4,
        "kv_cache_config": {"tokens_per_block": 64, "enable_block_reuse": True},
        "enable_attention_dp": False,
    }
    config = EngineConfig(enable_prefix_caching=False, tensorrt_llm={"llm_args": extra})
    args = map_llm_kwargs(tmp_path, config, max_model_len=2048)
    assert args["max_batch_size"] == 4 and args["enable_attention_dp"] is False
    assert args["kv_cache_config"].kwargs == {
        "free_gpu_memory_fraction": 0.9, "enable_block_reuse": True, "tokens_per_block": 64,
    }  # fmt: skip


def test_the_deployment_drafter_maps_to_tensorrt_llm_speculation(tmp_path: Path) -> None:
    lookup = SpeculativeConfig(drafter="prompt-lookup", num_tokens=5, ngram_min=2, ngram_max=3, ngram_history=False)
    assert speculative_config(lookup, "pytorch") == LibraryObject(
        "tensorrt_llm.llmapi", "NGramDecodingConfig",
        {"max_draft_len": 5, "max_matching_ngram_size": 3, "is_public_pool": False},
    )  # fmt: skip
    draft = SpeculativeConfig(drafter="draft-model", draft_model="/models/draft", num_tokens=3)
    assert speculative_config(draft, "pytorch") == LibraryObject(
        "tensorrt_llm.llmapi",
        "DraftTargetDecodingConfig",
        {"max_draft_len": 3, "speculative_model_dir": "/models/draft"},
    )
    assert speculative_config(SpeculativeConfig(), "tensorrt") is None
    with pytest.raises(ValueError, match="draft_model"):
        speculative_config(SpeculativeConfig(drafter="draft-model"), "pytorch")
    with pytest.raises(ValueError, match="draft_layers"):
        speculative_config(SpeculativeConfig(drafter="draft-model", draft_model="/d", draft_layers=2), "pytorch")
    with pytest.raises(ValueError, match="PyTorch backend only"):
        speculative_config(lookup, "tensorrt")
    args = map_llm_kwargs(tmp_path, EngineConfig(speculative=lookup.model_dump()), max_model_len=2048)
    assert args["speculative_config"].name == "NGramDecodingConfig"
    assert args["disable_overlap_scheduler"] is True  # as TensorRT-LLM's speculation examples run


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_devices_tensorrt_llm_does_not_place_are_refused(tmp_path: Path, device: str) -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        map_llm_kwargs(tmp_path, EngineConfig(device=device), max_model_len=2048)


def test_sampling_maps_to_tensorrt_llm_sampling_params() -> None:
    eos = frozenset({2, 0})
    greedy = sampling_params(SamplingParams(max_tokens=50, temperature=0.0, top_p=0.9), 20, eos, seed=7)
    assert greedy == {
        "n": 1, "max_tokens": 20, "ignore_eos": False, "stop_token_ids": [0, 2], "stop": None,
        "include_stop_str_in_output": True, "detokenize": False, "top_k": 1,  # top_k 1 is greedy
    }  # fmt: skip
    sampled = sampling_params(
        SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=("\n",)), 8, eos, seed=7
    )
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.9, 40, 3)
    assert sampled["stop"] == ["\n"] and sampled["include_stop_str_in_output"] is True
    unseeded = sampling_params(SamplingParams(temperature=1.0), 8, eos, seed=7)
    assert unseeded["seed"] == 7  # never the runtime's one default seed for every request
    assert unseeded["top_k"] == 0  # 0: every token (None would leave TensorRT-LLM to decide)
    ignoring = sampling_params(SamplingParams(temperature=0.0, ignore_eos=True), 8, eos, seed=7)
    assert ignoring["ignore_eos"] is True and ignoring["stop_token_ids"] is None


def test_an_adapter_becomes_a_lora_request() -> None:
    adapter = ExternalAdapter("support-router", ADAPTER, "v1", 8, lora_id=3)
    assert lora_request_args(adapter) == {"lora_name": "support-router", "lora_int_id": 3, "lora_path": str(ADAPTER)}


def test_cumulative_token_lists_become_deltas() -> None:
    cumulative = [[5], [5, 6, 7], [5, 6, 7], [5, 6, 7, 8]]  # an update may bring no new token
    seen, deltas = 0, []
    for ids in cumulative:
        delta = new_tokens(ids, seen)
        seen += len(delta)
        deltas.append(delta)
    assert deltas == [[5], [6, 7], [], [8]]
    assert [t for d in deltas for t in d] == cumulative[-1]


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [("stop", "stop"), ("length", "length"), ("cancelled", "abort"), ("timeout", "abort"), (None, "stop")],
)
def test_library_finish_reasons_map_to_the_shells_words(theirs: str | None, ours: str) -> None:
    assert finish_reason(theirs) == ours


# -- the engine against a stand-in of the documented API ----------------------------------------------------


@pytest.fixture
def library(monkeypatch: pytest.MonkeyPatch) -> Library:
    lib = Library()
    lib.install(monkeypatch)
    return lib


def request(rid: str, ids: list[int], adapter: str | None = None, **params: object) -> GenerationRequest:
    return GenerationRequest(rid, ids, SamplingParams(**{"max_tokens": 32, "temperature": 0.0, **params}), adapter)


async def started(model_dir: Path, **config: object) -> TensorRTLLMEngine:
    engine = TensorRTLLMEngine(model_dir, EngineConfig(backend="tensorrt-llm", **config))
    await engine.start()
    await engine.wait_started()
    return engine


async def collect(engine: TensorRTLLMEngine, req: GenerationRequest) -> list[GenerationOutput]:
    return [out async for out in engine.generate(req)]


def test_the_registered_backend_streams_what_the_library_streams(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        engine = create_engine(model_dir, EngineConfig(backend="tensorrt-llm", max_model_len=64, max_num_seqs=4))
        assert isinstance(engine, TensorRTLLMEngine)
        await engine.start()
        await engine.wait_started()
        assert engine.ready
        llm = library.llms[0]
        assert llm.runtime == "pytorch" and llm.model == str(model_dir) and llm.kwargs["max_batch_size"] == 4
        assert llm.kwargs["kv_cache_config"].kwargs["enable_block_reuse"] is True  # built from the mapping
        body = engine.tokenizer.encode("The capital of France is Paris")
        library.script = [([body[:1], body[1:4], body[4:]], "stop"), ([body[:2], body[2:3]], "length")]
        prompt = engine.tokenizer.encode("Q: capital of France?")
        outs = await collect(engine, request("a", prompt, max_tokens=1000))
        assert [o.token_ids for o in outs] == [body[:1], body[1:4], body[4:]]
        assert "".join(o.text for o in outs) == engine.tokenizer.decode(body)
        assert outs[-1].finish_reason is FinishReason.STOP
        call = library.calls[0]
        assert call.prompt == prompt and call.lora is None
        assert call.sampling.kwargs["max_tokens"] == 64 - len(prompt)  # clipped to the context window
        short = await collect(engine, request("b", prompt))
        assert short[-1].finish_reason is FinishReason.LENGTH and short[-1].num_generated_tokens == 3
        assert [c.result.aborts for c in library.calls] == [0, 0]  # the library finished both itself
        await engine.stop()
        assert llm.closed

    asyncio.run(run())


def test_a_stop_string_ends_the_request_here_and_aborts_it_in_the_library(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = engine.tokenizer.encode("Route: billing\nThanks for waiting")
        library.script = [([[t] for t in body], "length")]
        outs = await collect(engine, request("r", engine.tokenizer.encode("Q:"), stop=("\n",)))
        assert "".join(o.text for o in outs) == "Route: billing"
        assert outs[-1].finish_reason is FinishReason.STOP
        assert library.calls[0].sampling.kwargs["stop"] == ["\n"]  # the library was told too
        assert library.calls[0].result.aborts == 1
        await engine.stop()

    asyncio.run(run())


def test_adapter_requests_carry_their_lora_request(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        first = await engine.load_adapter("support-router", ADAPTER)
        reply = engine.tokenizer.encode("billing")
        library.script = [([reply], "stop"), ([reply], "stop"), ([reply], "stop")]
        prompt = engine.tokenizer.encode("Q:")
        await collect(engine, request("a", prompt, adapter="support-router"))
        await collect(engine, request("b", prompt))
        again = await engine.load_adapter("support-router", ADAPTER)  # a reload: a new id, so fresh weights
        await collect(engine, request("c", prompt, adapter="support-router"))
        lora = library.calls[0].lora
        assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("support-router", first.lora_id, str(ADAPTER))
        assert library.calls[1].lora is None
        assert library.calls[2].lora.lora_int_id == again.lora_id != first.lora_id
        await engine.stop()

    asyncio.run(run())


def test_a_consumer_leaving_early_aborts_the_request_in_the_library(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = engine.tokenizer.encode("one two three four")
        library.script = [([[t] for t in body], "length")]
        async with contextlib.aclosing(engine.generate(request("r", engine.tokenizer.encode("Q:")))) as stream:
            first = await anext(stream)
            assert first.token_ids == body[:1] and not first.finished
        assert library.calls[0].result.aborts == 1  # once, though both the stream and the shell end it
        assert engine.stats().num_running == 0
        await engine.stop()

    asyncio.run(run())


def test_an_abort_ends_the_stream_with_the_librarys_cancelled_finish(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        engine = await started(model_dir)
        body = engine.tokenizer.encode("one two three four")
        library.script = [([[t] for t in body], "length")]
        stream = engine.generate(request("r", engine.tokenizer.encode("Q:")))
        await anext(stream)
        await engine.abort("r")
        rest = [out async for out in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT
        assert library.calls[0].result.aborts == 1
        await engine.stop()

    asyncio.run(run())


def test_a_failed_start_leaves_the_engine_not_ready_with_the_reason(model_dir: Path, library: Library) -> None:
    async def run() -> None:
        library.fail_start = RuntimeError("no CUDA device is available")
        engine = await started(model_dir)
        assert not engine.ready
        assert engine.start_error is not None
        assert "tensorrt-llm" in engine.start_error and "no CUDA device is available" in engine.start_error
        with pytest.raises(EngineNotReadyError, match="no CUDA device is available"):
            await collect(engine, request("r", engine.tokenizer.encode("Q:")))
        await engine.stop()

    asyncio.run(run())


def test_the_shipped_tensorrt_llm_deployment_selects_this_backend() -> None:
    from ftserve.config import load_service_config

    cfg = load_service_config(Path(__file__).resolve().parents[2] / "bentos" / "tensorrt-llm.yaml")
    assert cfg.engine.backend == "tensorrt-llm" and cfg.engine.tensorrt_llm.runtime == "pytorch"
