"""Validated settings, one pydantic model per concern. This module is the one home of defaults.

A deployment file in ``bentos/`` is a YAML mapping that validates as :class:`ServiceConfig`. Values can be
overridden with dotted keys (``engine.dtype=float32``), given on ``bentoml serve --arg`` or as environment
variables ``FTSERVE_ENGINE__DTYPE=float32`` (double underscore between levels).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MODEL = "smollm2-135m-instruct"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SERVICE_FILE = PROJECT_ROOT / "bentos" / "default.yaml"
ENV_PREFIX = "FTSERVE_"
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A settings file or override is invalid; the message names the offending value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Strict):
    """Where converted models live."""

    home: Path = Field(
        default_factory=lambda: Path(os.environ.get("FTSERVE_HOME", "~/.cache/ftserve")).expanduser(),
        description="Root folder of the model store (env FTSERVE_HOME; default ~/.cache/ftserve).",
    )


MAX_SPEC_TOKENS = 16
Drafter = Literal["none", "prompt-lookup", "draft-model"]


class SpeculativeConfig(_Strict):
    """Speculative decoding in the native engine (off unless a drafter is named)."""

    drafter: Drafter = Field(
        "none",
        description="none; prompt-lookup (n-gram match against the prompt and the text so far); or draft-model "
        "(a smaller model sharing the tokenizer drafts greedily, see draft_model).",
    )
    num_tokens: int = Field(
        8,
        ge=1,
        le=MAX_SPEC_TOKENS,
        description="Most tokens drafted per step (k); adaptive takes fewer where they do not pay. A verified row "
        "costs little on the row-invariant CPU kernel, so long drafts pay on text copied from the prompt.",
    )
    ngram_max: int = Field(4, ge=1, le=8, description="Longest n-gram prompt lookup matches.")
    ngram_min: int = Field(2, ge=1, le=8, description="Shortest n-gram prompt lookup matches.")
    ngram_history: bool = Field(
        True,
        description="prompt-lookup: with no match in the request's own text, match recent outputs of the same "
        "adapter (the output templates a fine-tuned adapter repeats).",
    )
    adaptive: bool = Field(
        True, description="Choose k per request from its acceptance rate and the drafting cost (0 = off)."
    )
    draft_model: str | None = Field(
        None,
        description="draft-model: a model folder (store name or path, e.g. an optimize native export) sharing the "
        "served model's tokenizer; unset = a copy of the served model quantized at start-up (draft_quantize).",
    )
    draft_quantize: Literal["int8", "int4", "none"] = Field(
        "int8",
        description="draft-model without draft_model: how the copy of the served model is quantized (int8: on CPU "
        "its passes run in one compiled call, the fastest draft here).",
    )
    draft_layers: int | None = Field(
        None, ge=1, description="draft-model: run only the draft's first layers (layer-truncated self-draft)."
    )

    @model_validator(mode="after")
    def _ngram_range(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        return self


class VllmConfig(_Strict):
    """``backend: vllm``: vLLM's async engine in this process (``pip install 'ftserve[vllm]'``).

    The shared engine settings (``max_model_len``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_prefix_caching``, ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``, ``dtype``,
    ``device``) map to vLLM's engine arguments of the same meaning; these are vLLM's own."""

    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU memory vLLM may take (CUDA only).")
    kv_cache_gib: float = Field(
        4.0, gt=0, description="CPU only: KV-cache memory in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one replica shards the model over.")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation (faster start, slower steps).")
    start_timeout_s: float = Field(
        900.0, gt=0, description="Start-up (weights, profiling, compile) past this is a failed start."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM AsyncEngineArgs fields, passed as given; unknown names are refused at start.",
    )


class TensorRTLLMConfig(_Strict):
    """``backend: tensorrt-llm``: TensorRT-LLM's LLM API in this process (NVIDIA GPUs; its wheel comes from
    NVIDIA's index: ``pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com``)."""

    engine_dir: str | None = Field(
        None,
        description="A prebuilt engine (the optimize stage's tensorrt-llm export, built with trtllm-build); "
        "unset = the served model folder, which the LLM API builds or runs with its PyTorch backend.",
    )
    runtime: Literal["pytorch", "tensorrt"] = Field(
        "pytorch", description="LLM API backend: pytorch (no build step) or tensorrt (a built engine)."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one replica shards the model over.")
    kv_cache_free_gpu_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Fraction of free GPU memory given to the KV cache."
    )
    start_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Start-up (loading, or with runtime tensorrt and no engine_dir building the engine) past this "
        "is a failed start.",
    )
    llm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further LLM(...) keyword arguments: dicts merge into kv_cache_config, lora_config and "
        "speculative_config, anything else replaces ftserve's value; TensorRT-LLM refuses unknown names at start.",
    )


class EngineConfig(_Strict):
    """How the engine runs the model."""

    backend: Literal["native", "simple", "vllm", "tensorrt-llm"] = Field(
        "native",
        description="Engine implementation: native (continuous batching, paged KV), simple (reference), "
        "vllm (vLLM's async engine) or tensorrt-llm (TensorRT-LLM's LLM API).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype; auto = bfloat16 on CUDA, on CPUs with native bf16 (AVX512-BF16, AMX) and for "
        "weight-only quantized models, float32 otherwise.",
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default one per core.")
    max_model_len: int = Field(2048, ge=16, le=1 << 20, description="Context window: prompt + new tokens.")
    max_num_seqs: int = Field(8, ge=1, le=4096, description="Requests decoded at the same time.")
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait; past this a request gets 429.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Tokens computed per step; long prompts are prefilled in chunks of this size."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="KV-cache capacity in tokens; default max_num_seqs * max_model_len."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse the KV of shared prompt prefixes.")
    attention_kernel: Literal["auto", "torch"] = Field(
        "auto",
        description="Decode attention on CPU (float32 or bfloat16 cache): auto = the compiled paged-attention kernel "
        "(built on first start, cached; torch's path with a logged reason if it cannot be built), torch = "
        "gather each row's KV blocks and attend with torch matmuls.",
    )
    linear_kernel: Literal["auto", "torch"] = Field(
        "auto",
        description="Dense projections on CPU (float32 or bfloat16): auto = the compiled row-invariant kernel, whose "
        "result for a token does not depend on the other tokens of the forward (greedy output then stays the same "
        "with speculation and in any batch; torch's path with a logged reason if it cannot be built), "
        "torch = F.linear (oneDNN / MKL, whose summation order follows the row count). auto also runs an INT8 "
        "draft model's passes in one compiled call; torch keeps them in Python.",
    )
    max_loras: int = Field(8, ge=1, le=256, description="LoRA adapters resident for compute at once (slots).")
    max_lora_rank: int = Field(32, ge=1, le=512, description="Largest LoRA rank an adapter may have.")
    max_cpu_loras: int = Field(
        64, ge=1, description="Adapters whose weights stay in CPU memory; older idle ones are reloaded from disk."
    )
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    tensorrt_llm: TensorRTLLMConfig = Field(default_factory=TensorRTLLMConfig)


class LimitsConfig(_Strict):
    """Limits enforced at the API boundary."""

    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most stop strings per request.")
    max_stop_length: int = Field(64, ge=1, description="Longest stop string, in characters.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="A request still generating after this long is aborted (504); None = no limit."
    )


class SamplingDefaults(_Strict):
    """Sampling used when a request leaves a field out (like vLLM's generation-config override).

    Small instruct models ramble at OpenAI's default temperature 1.0; a deployment sets what its model
    card recommends.
    """

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Temperature when a request gives none.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="top_p when a request gives none.")
    top_k: int | None = Field(None, ge=1, description="top_k when a request gives none.")


class GrpcConfig(_Strict):
    """The gRPC API (``ftserve.v1``), served from the same process and engine as REST."""

    enabled: bool = Field(True, description="Start the gRPC server beside REST.")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds (0.0.0.0 for every interface).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port, logged at start).")
    max_message_bytes: int = Field(1 << 20, ge=1024, description="Largest gRPC request message.")


class ResponseCacheConfig(_Strict):
    """Exact-match cache of whole responses to deterministic requests (temperature 0 or a fixed seed)."""

    enabled: bool = Field(True, description="Answer repeated deterministic requests from the cache.")
    max_bytes: int = Field(64 << 20, ge=0, description="Memory bound of the cached responses (LRU beyond it).")
    ttl_s: float = Field(600.0, gt=0, description="Seconds a cached response stays valid.")


# Indicative on-demand prices in US dollars per hour (cloud list prices, late 2026); set usd_per_hour for yours.
HARDWARE_USD_PER_HOUR: dict[str, float] = {
    "cpu": 0.10,  # a 2-vCPU general-purpose VM
    "t4": 0.53,
    "l4": 0.80,
    "a10g": 1.01,
    "a100-40gb": 1.50,
    "a100-80gb": 2.00,
    "h100-80gb": 3.00,
    "h200": 3.80,
}


class PricingConfig(_Strict):
    """How ``ftserve_cost_usd_total{adapter}`` is computed: hardware time plus optional per-token prices."""

    hardware: str = Field(
        "auto",
        description=f"Row of the price table ({', '.join(HARDWARE_USD_PER_HOUR)}); auto = cpu, or the CUDA "
        "device's name when it matches a row.",
    )
    usd_per_hour: float | None = Field(None, ge=0, description="Hardware price per hour; overrides the table.")
    usd_per_1k_prompt_tokens: float = Field(0.0, ge=0, description="Added per 1,000 prompt tokens processed.")
    usd_per_1k_completion_tokens: float = Field(0.0, ge=0, description="Added per 1,000 tokens generated.")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, value: str) -> str:
        if value != "auto" and value not in HARDWARE_USD_PER_HOUR:
            raise ValueError(f"unknown hardware {value!r}; known: auto, {', '.join(HARDWARE_USD_PER_HOUR)}")
        return value


class AdminConfig(_Strict):
    """The adapter admin API (REST ``/v1/adapters``, gRPC ``LoadAdapter``/``UnloadAdapter``)."""

    token_env: str = Field(
        "FTSERVE_ADMIN_TOKEN",
        description="Environment variable holding the bearer token; admin calls are refused while it is unset.",
    )


class ServiceConfig(_Strict):
    """One deployment: the model, the engine, the adapters, the limits."""

    model: str = Field(DEFAULT_MODEL, description="Model reference: a bundled name or a local HF folder.")
    served_model_name: str | None = Field(None, description="Name clients use for the base model.")
    adapter_dirs: list[Path] = Field(
        default_factory=lambda: [PROJECT_ROOT / "adapters"],
        description="Allowed folders that adapters load from, by name.",
    )
    adapters: list[str] = Field(default_factory=list, description="Adapters to load at start-up.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @property
    def base_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``FTSERVE_ENGINE__DTYPE=x`` → ``{"engine.dtype": "x"}``; FTSERVE_HOME/FTSERVE_CONFIG are not keys."""
    environ = dict(os.environ) if environ is None else environ
    out: dict[str, str] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            out[name[len(ENV_PREFIX) :].lower().replace("__", ".")] = value
    return out


def _parse_value(value: Any) -> Any:
    """Override values arrive as strings; YAML-parse them so lists and numbers work (``[a, b]``, ``4``)."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def load_yaml_config(file: Path, model: type[M], what: str, overrides: dict[str, Any] | None = None) -> M:
    """Read a YAML mapping, apply dotted overrides, validate as ``model``; errors name the file and value."""
    if not file.is_file():
        raise ConfigError(f"{what} {str(file)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(file)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(file)!r} must be a mapping, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, _parse_value(value))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{what} {str(file)!r}: {exc}") from exc


def load_service_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> ServiceConfig:
    """Read a deployment file (default: ``$FTSERVE_CONFIG`` or ``bentos/default.yaml``) and apply overrides.

    Environment overrides apply first, explicit ``overrides`` (from ``--arg``) last.
    """
    file = Path(path or os.environ.get("FTSERVE_CONFIG") or DEFAULT_SERVICE_FILE)
    return load_yaml_config(file, ServiceConfig, "service config", {**env_overrides(), **(overrides or {})})
