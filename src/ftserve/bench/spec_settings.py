"""What ``ftserve bench spec`` measures and with which settings (no torch here: the CLI imports it)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ftserve.config import DEFAULT_MODEL, MAX_SPEC_TOKENS, SpeculativeConfig

DRAFT_FORM = re.compile(r"^(int8|int4|none)(?::(\d+))?$")  # quantization of the served model's copy[:layers]


class SpecBenchConfig(BaseModel):
    """Settings of ``ftserve bench spec``; the CLI options are generated from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Served (target) model: a bundled name or a local HF folder.")
    adapter: Path | None = Field(
        Path("adapters/order-extract"), description="Adapter the order-extract prompts run with (unset: base)."
    )
    extract_items: Path = Field(
        Path("data/heldout/order-extract.handwritten.jsonl"), description="Order texts of the grounded scenario."
    )
    drafts: list[str] = Field(
        default_factory=lambda: ["int4", "int8"],
        min_length=1,
        description="Draft models, one set of draft-model rows each: int8 / int4 (a quantized copy of the served "
        "model) or none (its own weights), optionally :N for only the first N layers (none:20 = self-draft).",
    )
    num_tokens: int = Field(
        SpeculativeConfig.model_fields["num_tokens"].default,
        ge=1,
        le=MAX_SPEC_TOKENS,
        description="Most tokens drafted per step (k).",
    )
    batches: list[int] = Field(default_factory=lambda: [1, 8], min_length=1, description="Concurrent requests.")
    requests: int = Field(8, ge=1, le=64, description="Prompts per scenario (each batch size runs them all).")
    max_new_tokens: int = Field(128, ge=8, description="Token limit per request (greedy, stops at EOS).")
    repeats: int = Field(3, ge=1, le=20, description="Runs per case; tokens_per_s is their median.")

    @field_validator("drafts")
    @classmethod
    def _draft_forms(cls, drafts: list[str]) -> list[str]:
        for draft in drafts:
            if not DRAFT_FORM.match(draft):
                raise ValueError(f"draft {draft!r}: expected int8, int4 or none, optionally :LAYERS (e.g. none:20)")
        return drafts
