"""What ``ftserve bench optimize`` measures: its variants and settings (no torch here: the CLI imports it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ftserve.config import DEFAULT_MODEL

VariantName = Literal["fp32", "bf16", "merged", "int8", "int4", "gptq"]
VARIANTS: tuple[VariantName, ...] = ("fp32", "bf16", "merged", "int8", "int4", "gptq")


class OptimizeBenchConfig(BaseModel):
    """Settings of ``ftserve bench optimize``; the CLI options are generated from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="Base model: a bundled name or a local HF folder.")
    adapter: Path = Field(Path("adapters/support-router"), description="The fine-tuned LoRA adapter (PEFT folder).")
    train_config: Path = Field(
        Path("adapters/support-router.yaml"),
        description="The adapter's training config: its task, held-out split and GPTQ calibration data.",
    )
    heldout: list[Path] = Field(
        default_factory=lambda: [Path("data/heldout/support-router.handwritten.jsonl")],
        description="Extra held-out task files scored for exact match.",
    )
    text: Path = Field(Path("data/general/heldout.txt"), description="Held-out general text for perplexity.")
    variants: list[VariantName] = Field(
        default_factory=lambda: list(VARIANTS), min_length=1, description="Variants to measure, in order."
    )
    max_items: int = Field(300, ge=1, description="Held-out task items scored per variant.")
    group_size: int = Field(64, description="INT4 / GPTQ group size (SmolLM2: 32 or 64).")
    int4_grid: Literal["symmetric", "asymmetric"] = Field(
        "asymmetric", description="INT4 / GPTQ grid (the vllm export needs symmetric, which costs quality)."
    )
    clip_search: bool = Field(
        True, description="GPTQ: per-group range shrink minimising rounding error (it made round-to-nearest worse)."
    )
    act_order: bool = Field(True, description="GPTQ: columns by decreasing Hessian diagonal, static groups.")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ Hessian dampening (fraction of its mean diagonal).")
    calibration_items: int = Field(128, ge=1, description="GPTQ calibration sequences.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens each speed request makes.")
    b1_repeats: int = Field(
        3, ge=1, le=50, description="Single-stream runs per variant; tokens_per_s_b1 is their median."
    )
