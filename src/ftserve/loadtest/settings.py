"""Load-test settings: the SLO file, the scenario file and the command's options, each a validated model.

A file with an unknown key or an impossible value fails here, with the key named, before any load is sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ftserve.config import load_yaml_config
from ftserve.engine.request import SpeculationParams

Protocol = Literal["rest", "grpc"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SloConfig(_Strict):
    """What a run must meet (``loadtest/slo.yaml``). Latencies are client-side, in milliseconds."""

    p95_ttft_ms: float = Field(gt=0, description="95th percentile time to first token.")
    p95_e2e_ms: float = Field(gt=0, description="95th percentile end-to-end latency (request sent to last token).")
    p95_itl_ms: float | None = Field(None, gt=0, description="95th percentile gap between streamed chunks.")
    max_error_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Failed requests / all requests.")
    min_tokens_per_s: float | None = Field(None, gt=0, description="Generated tokens per second, all users.")
    min_requests: int = Field(1, ge=1, description="Fewer finished requests than this is no verdict (a breach).")

    @model_validator(mode="after")
    def _consistent(self) -> SloConfig:
        if self.p95_ttft_ms > self.p95_e2e_ms:
            raise ValueError(
                f"p95_ttft_ms ({self.p95_ttft_ms:g}) exceeds p95_e2e_ms ({self.p95_e2e_ms:g}): "
                "the first token cannot come after the last"
            )
        if self.p95_itl_ms is not None and self.p95_itl_ms > self.p95_e2e_ms:
            raise ValueError(f"p95_itl_ms ({self.p95_itl_ms:g}) exceeds p95_e2e_ms ({self.p95_e2e_ms:g})")
        return self


class PromptSource(_Strict):
    """Where a scenario's prompts come from: exactly one of a JSONL of chats, a text file, or a list."""

    jsonl: Path | None = Field(None, description="Chat records; the first user turn of each is a prompt.")
    text: Path | None = Field(None, description="Plain text; paragraphs (blank-line separated) are joined.")
    inline: list[str] | None = Field(None, min_length=1, description="Prompts given in the file itself.")

    @model_validator(mode="after")
    def _one(self) -> PromptSource:
        given = [name for name in ("jsonl", "text", "inline") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of jsonl, text or inline (got {given or 'none'})")
        return self


class Scenario(_Strict):
    """One kind of request in the mix."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1, description="An adapter name, or 'base' for the served base model.")
    weight: float = Field(1.0, gt=0, description="Relative frequency in the mix.")
    prompts: PromptSource
    context: int = Field(1, ge=1, le=64, description="Prompts (records / paragraphs) joined into one request.")
    template: str = Field("{text}", description="Wraps the joined prompts; must contain {text}.")
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    repeat: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of requests that re-send one of a few recent identical ones."
    )
    speculative: SpeculationParams | None = Field(
        None, description="The requests' own speculative decoding ({drafter, num_tokens}); unset: the deployment's."
    )

    @model_validator(mode="after")
    def _template(self) -> Scenario:
        if "{text}" not in self.template:
            raise ValueError(f"scenario {self.name!r}: template must contain {{text}}")
        return self


class ScenarioFile(_Strict):
    """``loadtest/scenarios.yaml``: the request mix, protocol weights and think time."""

    protocols: dict[Protocol, float] = Field(
        default_factory=lambda: {"rest": 3.0, "grpc": 1.0}, description="User-class weights per protocol."
    )
    think_time_s: tuple[float, float] = Field((0.0, 0.5), description="A user waits uniformly in [a, b] between.")
    scenarios: list[Scenario] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioFile:
        low, high = self.think_time_s
        if not 0 <= low <= high:
            raise ValueError(f"think_time_s must be 0 <= a <= b, got {list(self.think_time_s)}")
        if not any(weight > 0 for weight in self.protocols.values()) or min(self.protocols.values()) < 0:
            raise ValueError(f"protocol weights must be >= 0 with one > 0, got {self.protocols}")
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario names repeat: {names}")
        return self


class LoadtestConfig(_Strict):
    """``ftserve loadtest`` options (the CLI is generated from these fields)."""

    host: str = Field("http://127.0.0.1:3000", description="REST base URL of the running service.")
    grpc_target: str = Field("127.0.0.1:50051", description="gRPC host:port of the running service.")
    users: int = Field(16, ge=1, le=10_000, description="Concurrent simulated users.")
    spawn_rate: float = Field(4.0, gt=0, description="Users started per second.")
    duration: str = Field("2m", description="Run length after the first user starts: 90s, 2m, 1h30m.")
    slo: Path = Field(Path("loadtest/slo.yaml"), description="SLO file the run is judged against.")
    scenarios: Path = Field(Path("loadtest/scenarios.yaml"), description="Request mix.")
    seed: int = Field(0, description="Seed of the prompt choices (each user derives its own).")
    request_timeout_s: float = Field(120.0, gt=0, description="A request taking longer counts as failed.")
    markdown: Path | None = Field(None, description="Write the markdown report here (default: print it).")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"host must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @property
    def duration_s(self) -> float:
        return parse_duration(self.duration)

    @model_validator(mode="after")
    def _duration(self) -> LoadtestConfig:
        parse_duration(self.duration)
        return self


def parse_duration(text: str) -> float:
    """``90s``, ``2m``, ``1h30m``, ``45`` (seconds) → seconds; a clear error otherwise."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    total, number = 0.0, ""
    for char in text.strip():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total += float(number) * units[char]
            number = ""
        else:
            raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 2m or 1h30m")
    total += float(number) if number else 0.0
    if total <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return total


def load_slo(path: Path) -> SloConfig:
    return load_yaml_config(path, SloConfig, "SLO file")


def load_scenarios(path: Path) -> ScenarioFile:
    """The scenario file, with prompt paths made relative to the file's own folder."""
    plan = load_yaml_config(path, ScenarioFile, "scenario file")
    scenarios = []
    for scenario in plan.scenarios:
        source = scenario.prompts
        update = {k: path.parent / v for k in ("jsonl", "text") if (v := getattr(source, k)) is not None}
        scenarios.append(scenario.model_copy(update={"prompts": source.model_copy(update=update)}))
    return plan.model_copy(update={"scenarios": scenarios})
