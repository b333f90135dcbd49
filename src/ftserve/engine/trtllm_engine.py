"""``engine.backend: tensorrt-llm``: TensorRT-LLM's LLM API (public API only) behind the ``Engine`` protocol.

Written against TensorRT-LLM 1.2.x (1.2.1 is the release PyPI lists; its wheel comes from NVIDIA's index), as
its documentation and source describe it:

- ``LLM(model, tokenizer, tensor_parallel_size, dtype, **kwargs)``, the other keywords being ``TorchLlmArgs``
  fields (PyTorch backend) or ``TrtLlmArgs`` fields (TensorRT engines): the LLM API reference,
  https://nvidia.github.io/TensorRT-LLM/llm-api/reference.html and .../llm-api/reference/TorchLlmArgs.html
  (source: tensorrt_llm/llmapi/llm.py, tensorrt_llm/llmapi/llm_args.py). ``tensorrt_llm.LLM`` is the PyTorch
  backend; a built engine runs under ``tensorrt_llm._tensorrt_engine.LLM``, the class TensorRT-LLM's model
  guides and its own argument check name for the TensorRT backend.
- Streaming: ``generate_async(token_ids, sampling_params, lora_request=..., streaming=True)`` returns a
  ``RequestOutput`` that is its own async iterator, updated in place; ``outputs[0].token_ids`` holds every
  token so far (cumulative), ``finished`` and ``outputs[0].finish_reason`` ('stop', 'length', 'timeout',
  'cancelled') end it, ``abort()`` cancels it:
  https://nvidia.github.io/TensorRT-LLM/1.2.1/examples/llm_inference_async_streaming.html
  (source: tensorrt_llm/executor/result.py).
- ``SamplingParams``: tensorrt_llm/sampling_params.py (top_k / top_p / temperature semantics are in its
  docstring: nothing set is greedy, ``top_k=1`` is greedy, ``top_k=0`` keeps every token, ``seed=None`` is the
  runtime's fixed default seed).
- LoRA: https://nvidia.github.io/TensorRT-LLM/features/lora.html (source: tensorrt_llm/lora_helper.py,
  tensorrt_llm/executor/request.py). Speculative decoding:
  https://nvidia.github.io/TensorRT-LLM/features/speculative-decoding.html

Everything TensorRT-LLM-specific is the mapping below: the deployment's settings become ``LLM(...)`` keywords
(``llm_kwargs``), a request's sampling becomes ``SamplingParams`` keywords (``sampling_params``), an adapter a
``LoRARequest`` (``lora_request_args``), and the cumulative stream becomes token deltas (``new_tokens``,
``finish_reason``). Token acceptance, adapter checks and draining, metrics and the start-up in the background
are the shared shell in ``engine/external.py``. The package is imported only when the engine starts, so this
module imports everywhere; selecting the backend without it fails at once, naming what to install.

Adapters: TensorRT-LLM reads a Hugging Face PEFT folder itself (``LoraConfig.lora_ckpt_source`` "hf", the
default) the first time a request carries its ``LoRARequest(name, int id, path)``, keeps it in its PEFT cache
(``max_loras`` on the GPU, ``max_cpu_loras`` in host memory) and evicts the least recently used. The LLM API
has no call to add, pin or remove an adapter, so loading is per request and ``_add_adapter`` /
``_remove_adapter`` have nothing to tell it; the shell gives every (re)load a new id, so stale weights are
never served under an old one, and TensorRT-LLM's own LRU drops them.

Not available through the public API, so not reported: prompt tokens found in the prefix cache, a health flag
of the executor (a dead executor fails each request with its error), per-step timing (the shell estimates it).
None of this has run here: the package cannot be installed on these machines; the tests cover the mapping and
the engine against a stand-in that implements the documented contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftserve.config import EngineConfig, SpeculativeConfig
from ftserve.engine.external import ExternalEngine
from ftserve.engine.library import BackendUpdate, ExternalAdapter, build_off_loop, require_module
from ftserve.engine.loader import HFTokenizer, eos_token_ids
from ftserve.engine.protocol import register_engine
from ftserve.engine.request import GenerationRequest, SamplingParams

INSTALL = (
    "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com "
    "(1.2.x, the API this backend follows; Linux with an NVIDIA GPU and CUDA: there is no CPU build)"
)

# ftserve's LoRA targets (Hugging Face module names) under TensorRT-LLM's names: lora_helper's
# get_default_trtllm_modules_to_hf_modules(), inverted. Note gate_proj is mlp_h_to_4h and up_proj is mlp_gate.
LORA_MODULES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "up_proj": "mlp_gate",
    "down_proj": "mlp_4h_to_h",
}

# CompletionOutput.finish_reason → the words the shell reads (external.py: "stop", "length", "abort").
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}


@dataclass(frozen=True)
class LibraryObject:
    """A TensorRT-LLM config object built at start-up as ``module.name(**kwargs)``; plain data until then, so
    the mapping can be read and tested without the package."""

    module: str
    name: str
    kwargs: dict[str, Any]

    def build(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(**self.kwargs)


def check_device(device: str) -> None:
    if device not in ("auto", "cuda", "cuda:0"):
        raise ValueError(
            f"engine.backend tensorrt-llm runs on NVIDIA GPUs and places its workers itself; engine.device "
            f"{device!r} is not supported (use auto, and pick GPUs with CUDA_VISIBLE_DEVICES)"
        )


def speculative_config(spec: SpeculativeConfig, runtime: str) -> LibraryObject | None:
    """TensorRT-LLM's speculation for the deployment's drafter (per deployment, PyTorch backend only)."""
    if spec.drafter == "none":
        return None
    if runtime != "pytorch":
        raise ValueError(
            "engine.backend tensorrt-llm runs speculative decoding (NGram, DraftTarget) on its PyTorch backend "
            "only: set engine.tensorrt_llm.runtime: pytorch, or speculative.drafter: none"
        )
    if spec.drafter == "prompt-lookup":
        # Prompt lookup is TensorRT-LLM's NGram drafter. It matches prompt suffixes of up to
        # max_matching_ngram_size tokens (it has no lower bound: ngram_min is not used) and drafts num_tokens
        # on every step (no adaptive k). ngram_history maps to its pool shared by all requests
        # (is_public_pool), which spans every adapter where ftserve's history is per adapter.
        kwargs = {"max_draft_len": spec.num_tokens, "max_matching_ngram_size": spec.ngram_max,
                  "is_public_pool": spec.ngram_history}  # fmt: skip
        return LibraryObject("tensorrt_llm.llmapi", "NGramDecodingConfig", kwargs)
    if spec.draft_model is None:
        raise ValueError(
            "engine.backend tensorrt-llm with speculative.drafter draft-model needs speculative.draft_model "
            "(a folder TensorRT-LLM loads); it does not quantize a copy of the served model at start-up"
        )
    if spec.draft_layers is not None:
        raise ValueError("engine.backend tensorrt-llm cannot truncate a draft model: unset speculative.draft_layers")
    kwargs = {"max_draft_len": spec.num_tokens, "speculative_model_dir": spec.draft_model}
    return LibraryObject("tensorrt_llm.llmapi", "DraftTargetDecodingConfig", kwargs)


def llm_kwargs(model_dir: Path, config: EngineConfig, max_model_len: int) -> dict[str, Any]:
    """``LLM(...)`` keywords for this deployment, config objects still as ``LibraryObject``s.

    ``engine.tensorrt_llm.llm_args`` is applied last: a dict given for one of the objects mapped here
    (kv_cache_config, lora_config, speculative_config) adds to or overrides its fields; any other value
    replaces ftserve's as given. Names are not checked here (that needs the package): ``LLM()`` itself refuses
    one it does not know ("LLM got invalid argument: ..."), which then is the start error."""
    tc = config.tensorrt_llm
    check_device(config.device)
    if tc.engine_dir is not None:
        if tc.runtime != "tensorrt":
            raise ValueError(
                "engine.tensorrt_llm.engine_dir is a built TensorRT engine: set engine.tensorrt_llm.runtime: "
                "tensorrt, or unset engine_dir to run the served model on the PyTorch backend"
            )
        if not Path(tc.engine_dir).is_dir():
            raise FileNotFoundError(
                f"engine.tensorrt_llm.engine_dir {tc.engine_dir!r} is not a folder: build it first with the "
                "commands in the optimize stage's tensorrt-llm export (BUILD.md)"
            )
    kv_cache = {"free_gpu_memory_fraction": tc.kv_cache_free_gpu_memory_fraction,
                "enable_block_reuse": config.enable_prefix_caching}  # fmt: skip
    if config.kv_cache_tokens is not None:
        kv_cache["max_tokens"] = config.kv_cache_tokens  # TensorRT-LLM takes the smaller of the two bounds
    lora = {
        "lora_target_modules": list(LORA_MODULES.values()),
        "max_lora_rank": config.max_lora_rank,
        "max_loras": config.max_loras,
        "max_cpu_loras": max(config.max_cpu_loras, config.max_loras),  # the host cache holds the device's
    }
    args: dict[str, Any] = {
        "model": tc.engine_dir or str(model_dir),
        "tokenizer": str(model_dir),  # a built engine folder holds no tokenizer
        "tensor_parallel_size": tc.tensor_parallel_size,
        "dtype": config.dtype,
        "max_batch_size": config.max_num_seqs,
        "max_num_tokens": max(config.max_num_batched_tokens, config.max_num_seqs),
        "max_seq_len": max_model_len,
        # Prompts longer than max_num_tokens are refused unless prefilled in chunks (as ftserve's engine does).
        "enable_chunked_prefill": True,
        "kv_cache_config": LibraryObject("tensorrt_llm.llmapi", "KvCacheConfig", kv_cache),
        "lora_config": LibraryObject("tensorrt_llm.lora_manager", "LoraConfig", lora),
    }
    if tc.runtime == "pytorch":
        args["backend"] = "pytorch"
    spec = speculative_config(config.speculative, tc.runtime)
    if spec is not None:
        args["speculative_config"] = spec
        args["disable_overlap_scheduler"] = True  # as TensorRT-LLM's NGram and DraftTarget examples run
    return merge_llm_args(args, tc.llm_args)


def merge_llm_args(args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(args)
    for name, value in extra.items():
        current = merged.get(name)
        if isinstance(current, LibraryObject) and isinstance(value, dict):
            merged[name] = dataclasses.replace(current, kwargs={**current.kwargs, **value})
        else:
            merged[name] = value
    return merged


def build_llm_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    """The keywords with their config objects built (needs the package)."""
    return {k: v.build() if isinstance(v, LibraryObject) else v for k, v in args.items()}


def sampling_params(params: SamplingParams, max_tokens: int, eos_ids: frozenset[int], seed: int) -> dict[str, Any]:
    """TensorRT-LLM ``SamplingParams`` keywords: the same sampling, ``seed`` used when the request sets none."""
    args: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens,
        "ignore_eos": params.ignore_eos,
        # Every end-of-sequence id ftserve stops at (the generation config may list several), so the library
        # stops computing where ftserve's own check ends the request.
        "stop_token_ids": None if params.ignore_eos else sorted(eos_ids),
        "stop": list(params.stop) or None,
        # TensorRT-LLM otherwise cuts a matched stop word out of token_ids in the final update, so the list
        # would shrink; kept, it only grows, and ftserve's detokenizer drops the stop string from the text.
        "include_stop_str_in_output": True,
        "detokenize": False,  # ftserve decodes the tokens itself
    }
    if params.greedy:
        args["top_k"] = 1  # "top_k = 1 results in greedy sampling"
        return args
    return args | {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or 0,  # 0: every token
        # seed=None would be the runtime's default seed, the same for every request: draw one instead.
        "seed": params.seed if params.seed is not None else seed,
    }


def lora_request_args(adapter: ExternalAdapter) -> dict[str, Any]:
    """``LoRARequest`` fields: TensorRT-LLM loads the folder on first use and caches it under the id."""
    return {"lora_name": adapter.name, "lora_int_id": adapter.lora_id, "lora_path": str(adapter.path)}


def new_tokens(token_ids: Sequence[int], seen: int) -> list[int]:
    """The tokens of a cumulative list past the ``seen`` already handed on."""
    return list(token_ids[seen:])


def finish_reason(reason: str | None) -> str:
    """The shell's word for a finished output's reason; a finish without one ended at an end id: stop."""
    return FINISH_REASONS.get(reason, "stop") if reason is not None else "stop"


class TensorRTLLMEngine(ExternalEngine):
    backend_name = "tensorrt-llm"

    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        require_module("tensorrt_llm", "tensorrt-llm", INSTALL)  # before anything touches the model
        tokenizer = HFTokenizer(model_dir)
        super().__init__(model_dir, config, tokenizer, eos_token_ids(model_dir, tokenizer))
        self._llm_kwargs = llm_kwargs(model_dir, config, self.max_model_len)  # a bad setting fails here
        self._llm: Any = None
        self._sampling_cls: Any = None  # tensorrt_llm.SamplingParams
        self._lora_cls: Any = None  # tensorrt_llm.executor.request.LoRARequest
        self._results: dict[str, Any] = {}  # request id → its RequestOutput while it streams

    async def _start_backend(self) -> None:
        from tensorrt_llm import SamplingParams as TrtSamplingParams
        from tensorrt_llm.executor.request import LoRARequest

        if self.config.tensorrt_llm.runtime == "tensorrt":
            from tensorrt_llm._tensorrt_engine import LLM
        else:
            from tensorrt_llm import LLM
        self._sampling_cls, self._lora_cls = TrtSamplingParams, LoRARequest
        kwargs = build_llm_kwargs(self._llm_kwargs)
        # Loading (or building) the model and starting the workers is blocking work: off the event loop.
        self._llm = await build_off_loop(lambda: LLM(**kwargs), lambda llm: llm.shutdown())

    def _start_timeout_s(self) -> float:
        return self.config.tensorrt_llm.start_timeout_s

    async def _stop_backend(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def _alive(self) -> bool:
        return self._llm is not None  # the LLM API exposes no health flag of its executor

    async def _add_adapter(self, adapter: ExternalAdapter) -> None:
        """Nothing to do: TensorRT-LLM loads an adapter from the LoRARequest of its first request."""

    async def _remove_adapter(self, adapter: ExternalAdapter) -> None:
        """Nothing to do: the LLM API has no unload; its PEFT cache evicts ids no request uses any more."""

    async def _stream(
        self, request: GenerationRequest, adapter: ExternalAdapter | None
    ) -> AsyncIterator[BackendUpdate]:
        args = sampling_params(request.params, self.max_new_tokens(request), self.eos_ids, random.getrandbits(63))
        lora = self._lora_cls(**lora_request_args(adapter)) if adapter is not None else None
        rid = request.request_id
        result = self._llm.generate_async(
            list(request.prompt_token_ids),
            sampling_params=self._sampling_cls(**args),
            lora_request=lora,
            streaming=True,
        )
        self._results[rid] = result
        seen = 0
        try:
            async for out in result:  # the same RequestOutput each time, its token_ids grown
                completion = out.outputs[0]
                tokens = new_tokens(completion.token_ids, seen)
                seen += len(tokens)
                reason = finish_reason(completion.finish_reason) if out.finished else None
                yield BackendUpdate(tokens, finished=out.finished, finish_reason=reason)
        finally:
            self._abort_result(rid)  # the consumer left (or ftserve finished first): free the library's slot

    async def _abort_backend(self, request_id: str) -> None:
        self._abort_result(request_id)

    def _abort_result(self, request_id: str) -> None:
        """Abort a request still running in the library, once, whichever of the stream's end or the shell's
        abort comes first."""
        result = self._results.pop(request_id, None)
        if result is not None and not result.finished:
            result.abort()


@register_engine("tensorrt-llm")
def _build(model_dir: Path, config: EngineConfig) -> TensorRTLLMEngine:
    return TensorRTLLMEngine(model_dir, config)
