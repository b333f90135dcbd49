"""Validated training settings: one ``adapters/<name>.yaml`` validates as :class:`TrainConfig`.

Paths in the file are relative to the folder ``ftserve train`` runs in (the project root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftserve.config import DEFAULT_MODEL, load_yaml_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterConfig(_Strict):
    """Which quality filters run, and their bounds."""

    min_chars: int = Field(8, ge=0, description="Drop items whose prompt + answer is shorter than this.")
    max_chars: int = Field(4000, ge=1, description="Drop items whose prompt + answer is longer than this.")
    dedup_exact: bool = Field(True, description="Drop exact duplicates (after case and whitespace folding).")
    near_dup_threshold: float | None = Field(
        0.9, gt=0.0, le=1.0, description="Drop items this Jaccard-similar (char 5-grams) to a kept one; null = off."
    )
    pii: bool = Field(True, description="Redact PII (emails, phones, cards, IPs, IBANs, SSNs) as <KIND>.")
    pii_engine: Literal["regex", "presidio"] = Field("regex", description="regex (built in) or presidio (extra).")

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        return self


class DataSettings(_Strict):
    """Where the examples come from and how the held-out split is made."""

    train: Path = Field(description="JSONL file (Alpaca, chat or preference form).")
    heldout: Path | None = Field(None, description="Explicit held-out JSONL; default: split from `train`.")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of groups held out when splitting.")
    extra_heldout: list[Path] = Field(
        default_factory=list, description="More held-out files scored separately (e.g. hand-written items)."
    )
    general_text: Path | None = Field(None, description="Plain text for the perplexity (forgetting) check.")
    seed: int = Field(0, description="Split seed.")


class LoraSettings(_Strict):
    """The LoRA adapter's shape."""

    r: int = Field(16, ge=1, le=256, description="Rank.")
    alpha: int = Field(32, ge=1, description="Scale numerator: the delta is (alpha / r) * B @ A.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get an adapter.",
    )


class OptimSettings(_Strict):
    """The optimisation loop (shared by SFT and DPO)."""

    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Examples per step (per device).")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate (cosine decay after warm-up).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    max_length: int = Field(256, ge=16, description="Longest tokenized example; longer ones are truncated.")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="Autocast dtype (weights stay fp32).")
    seed: int = Field(0, description="Training seed (init, shuffling, dropout).")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps (resumable).")
    logging_steps: int = Field(10, ge=1, description="Log loss every this many steps.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default one per core.")


class ReplaySettings(_Strict):
    """Language-modelling loss on base-model text mixed into SFT, against forgetting (see train/replay.py)."""

    file: Path = Field(description="JSONL of {'text': ...} written by `ftserve data replay`.")
    weight: float = Field(1.0, ge=0.0, description="Weight of the replay loss next to the task loss.")
    objective: Literal["nll", "kl"] = Field(
        "nll", description="nll: likelihood of the base's sampled tokens; kl: KL(base || adapter) per position."
    )
    batch_size: int = Field(4, ge=1, description="Replay sequences per optimizer micro-step.")
    max_length: int = Field(96, ge=8, description="Tokens kept per replay sequence.")


class DPOSettings(_Strict):
    """DPO on preference pairs, starting from an SFT adapter; the reference is a frozen copy of it."""

    from_adapter: Path = Field(description="Folder of the SFT adapter to refine.")
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")


class EvalSettings(_Strict):
    """Held-out evaluation before (base model) and after (adapter)."""

    max_items: int = Field(300, ge=1, description="Held-out items scored (the first N).")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per answer.")
    batch_size: int = Field(32, ge=1, description="Prompts per generate call.")
    perplexity_window: int = Field(256, ge=16, description="Tokens per window for the perplexity check.")


class MlflowSettings(_Strict):
    """Optional MLflow tracking (the `mlflow` extra)."""

    enabled: bool = Field(False, description="Log params, metrics and the adapter to MLflow.")
    tracking_uri: str = Field("sqlite:///runs/mlflow.db", description="MLflow tracking store.")
    experiment: str = Field("ftserve-train", description="Experiment name.")
    artifact_root: Path = Field(Path("runs/mlflow-artifacts"), description="Where a new experiment keeps artifacts.")
    registered_model: str | None = Field(None, description="Register the adapter under this name.")
    alias: str = Field("candidate", description="Alias set on the new registered version.")


class TrainConfig(_Strict):
    """One adapter: data, method, LoRA shape, optimisation, evaluation, tracking."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Adapter name (served by it).")
    base: str = Field(DEFAULT_MODEL, description="Base model: a bundled name or a local HF folder.")
    method: Literal["sft", "dpo"] = Field("sft", description="sft (supervised) or dpo (preferences).")
    task: str | None = Field(None, description="Registered task whose scorer is used for exact match.")
    data: DataSettings
    filters: FilterConfig = Field(default_factory=FilterConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    dpo: DPOSettings | None = None
    replay: ReplaySettings | None = Field(None, description="Optional replay against forgetting (SFT only).")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    output_dir: Path = Field(Path("adapters"), description="The adapter is published to <output_dir>/<name>.")
    work_dir: Path = Field(Path("runs"), description="Checkpoints and split data go to <work_dir>/<name>.")

    @model_validator(mode="after")
    def _method_sections(self) -> TrainConfig:
        if self.method == "dpo" and self.dpo is None:
            raise ValueError("method: dpo needs a `dpo:` section with from_adapter")
        if self.method == "dpo" and self.replay is not None:
            raise ValueError("replay applies to SFT only; remove it from a dpo config")
        return self

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def run_dir(self) -> Path:
        return self.work_dir / self.name


def load_train_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    return load_yaml_config(path, TrainConfig, "training config", overrides)
