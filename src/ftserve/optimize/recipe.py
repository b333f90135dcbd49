"""Optimize recipes: ``optimize/<name>.yaml`` validates as :class:`Recipe`, a list of named steps.

An unknown step name fails validation with the list of known steps; quantizer names and group sizes are
checked against the model before any heavy work (see ``runner.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ftserve.config import DEFAULT_MODEL, load_yaml_config


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str | Path) else value


PathList = Annotated[list[Path], BeforeValidator(_as_list)]  # one path or a list of them


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeStep(_Step):
    """Fold a LoRA adapter into the weights."""

    step: Literal["merge"]
    adapter: Path = Field(description="PEFT adapter folder (safetensors).")


class QuantizeStep(_Step):
    """Weight-only quantization of the decoder's linear layers."""

    step: Literal["quantize"]
    method: str = Field(description="Registered quantizer: int8, int4, gptq.")
    group_size: int | None = Field(None, description="Input columns per scale (int4/gptq; 32 or 64 for SmolLM2).")
    sym: bool = Field(False, description="int4/gptq: symmetric grid (no zero points; needed for the vllm export).")
    clip_search: bool = Field(False, description="int4/gptq: per-group range shrink minimising rounding error.")
    act_order: bool = Field(False, description="gptq: columns by decreasing Hessian diagonal, static groups.")
    damp: float | None = Field(None, gt=0, le=1, description="gptq: Hessian dampening (fraction of mean diagonal).")
    calibration: PathList = Field(
        default_factory=list,
        description="Calibration data for methods that need it: training configs (adapters/<name>.yaml: its "
        "train split and replay text) and/or JSONL files (task examples, rendered with the chat template, or "
        "replay text {'text': ...}).",
    )
    head: Literal["int8", "dense"] = Field(
        "int8",
        description="The LM head: a per-row INT8 copy (the tied embedding's lookup stays dense; +0.04-0.24% "
        "perplexity on SmolLM2, a third less time at batch 1 in the head) or dense.",
    )
    calibration_items: int = Field(128, ge=1, description="Calibration sequences, spread evenly over the sources.")
    calibration_max_tokens: int = Field(256, ge=16, le=4096, description="Tokens kept per calibration sequence.")


class GateStep(_Step):
    """Quality gate against the model before quantization; a breach marks the output not ready."""

    step: Literal["gate"]
    text: Path = Field(description="Held-out plain text for perplexity.")
    max_perplexity_increase: float = Field(0.05, ge=0, description="Allowed relative perplexity increase.")
    heldout: PathList = Field(default_factory=list, description="Held-out task JSONL files for exact match.")
    heldout_split: Path | None = Field(
        None, description="Training config (adapters/<name>.yaml) whose held-out split is scored too."
    )
    task: str | None = Field(None, description="Task whose scorer is used (default: heldout_split's task).")
    adapter: Path | None = Field(
        None, description="Score exact match with this adapter served unmerged (LoRA) on both models."
    )
    max_exact_match_drop: float = Field(0.03, ge=0, le=1, description="Allowed exact-match drop (absolute).")
    max_items: int = Field(300, ge=1, description="Held-out items scored (the files first, then the split).")

    def inputs(self) -> list[Path]:
        """Files and folders the gate reads (their hashes go into the manifest)."""
        return [p for p in (self.text, *self.heldout, self.heldout_split, self.adapter) if p is not None]


class ExportStep(_Step):
    """Write the artifact for one engine."""

    step: Literal["export"]
    format: Literal["native", "vllm", "tensorrt-llm"] = Field("native", description="Target engine.")


Step = Annotated[MergeStep | QuantizeStep | GateStep | ExportStep, Field(discriminator="step")]


class Recipe(BaseModel):
    """One optimization: a base model, an ordered list of steps, an output folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Recipe name.")
    base: str = Field(DEFAULT_MODEL, description="Base model: a bundled name or a local HF folder.")
    steps: list[Step] = Field(min_length=1, description="Steps, run in order.")
    output_dir: Path = Field(Path("optimize/out"), description="The result goes to <output_dir>/<name>.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Compute dtype of the gate; auto = what the engine picks for each model (engine.dtype)."
    )

    @property
    def out(self) -> Path:
        return self.output_dir / self.name


def load_recipe(path: Path) -> Recipe:
    return load_yaml_config(path, Recipe, "optimize recipe")
