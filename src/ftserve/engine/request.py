"""Requests, sampling parameters and streamed outputs: the leaf types every engine shares."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from ftserve.config import MAX_SPEC_TOKENS, Drafter


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context window is full
    ABORT = "abort"  # cancelled: the client went away, or the engine shut down
    ERROR = "error"  # this request failed inside the engine; others are unaffected


class EngineError(RuntimeError):
    """Base class of errors an engine raises to a caller."""


class QueueFullError(EngineError):
    """The waiting queue is at its limit; the caller should retry later (HTTP 429)."""


class AdapterNotFoundError(EngineError):
    """The request names an adapter the engine does not hold."""


class EngineNotReadyError(EngineError):
    """The engine is starting or stopping."""


class SamplingParams(BaseModel):
    """How to pick tokens; validated here so every engine gets sane values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1, description="New tokens at most.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass kept.")
    top_k: int | None = Field(None, ge=1, description="Most likely tokens kept; None keeps all.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of this request's own generator.")
    stop: tuple[str, ...] = Field((), description="Strings that end generation; not included in the output.")
    ignore_eos: bool = Field(False, description="Keep going past end-of-sequence tokens.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SpeculationParams(BaseModel):
    """A request's own speculative-decoding settings; unset fields keep the deployment's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    drafter: Drafter | None = Field(None, description="none, prompt-lookup or draft-model.")
    num_tokens: int | None = Field(None, ge=1, le=MAX_SPEC_TOKENS, description="Most tokens drafted per step (k).")


@dataclass
class GenerationRequest:
    """One request as an engine sees it: token ids in, a stream of outputs back."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None: the base model
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() past which the request is aborted and its KV freed
    speculation: SpeculationParams | None = None  # None: the deployment's speculative settings


@dataclass
class GenerationOutput:
    """One streamed update. ``text``/``token_ids`` are the new part since the previous update."""

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int  # total so far, including held-back tokens
    finish_reason: FinishReason | None = None  # set on the last update only
    error: str | None = None  # set when finish_reason is ERROR
    # Set on the last update only:
    queue_s: float | None = None  # arrival → first scheduled (None: never scheduled)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_drafts: int = 0  # speculative decoding: steps that verified a draft
    num_draft_tokens: int = 0  # speculative decoding: tokens proposed
    num_accepted_tokens: int = 0  # speculative decoding: proposed tokens accepted

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def followed_by(self, later: GenerationOutput) -> GenerationOutput:
        """One update covering this one and ``later`` (several tokens accepted in one step)."""
        return dataclasses.replace(later, text=self.text + later.text, token_ids=self.token_ids + later.token_ids)
