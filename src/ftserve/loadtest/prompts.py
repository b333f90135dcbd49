"""Requests for the load test: a weighted pick of scenario, prompts drawn from each scenario's source, and
cache-friendly repeats (the same request again, which the response cache and the prefix cache can serve).
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ftserve.client import Ask
from ftserve.config import ConfigError
from ftserve.loadtest.settings import PromptSource, Scenario, ScenarioFile

BASE = "base"  # the scenario model that means "the served base model"
RECENT = 8  # identical requests a repeat chooses among, per scenario


def read_prompts(source: PromptSource) -> list[str]:
    """The prompts of a source; an empty or unreadable source is a ConfigError naming the file."""
    if source.inline is not None:
        return list(source.inline)
    path = source.jsonl or source.text
    assert path is not None  # the model validator guarantees one source
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"prompt file {path}: cannot read it ({exc.strerror})") from None
    if source.text is not None:
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
    else:
        prompts = [p for line in text.splitlines() if line.strip() and (p := _first_user_turn(line, path))]
    if not prompts:
        raise ConfigError(f"prompt file {path}: no prompts in it")
    return prompts


def _first_user_turn(line: str, path: Path) -> str:
    try:
        record = json.loads(line)
        return next(m["content"] for m in record["messages"] if m["role"] == "user")
    except (ValueError, KeyError, TypeError, StopIteration):
        raise ConfigError(f"prompt file {path}: each line must be a chat record with a user turn") from None


@dataclass(frozen=True)
class Planned:
    """One request to send: its scenario, the label its figures go under, and the request itself."""

    scenario: str
    adapter: str  # the model field, or "base"
    ask: Ask
    repeat: bool


class RequestPlan:
    """Draws requests for the scenarios of a file. One plan is shared by every user of a run, so a repeat
    re-sends a request some user sent recently, as a cache-friendly client population would."""

    def __init__(self, plan: ScenarioFile, base_model: str) -> None:
        self.scenarios = plan.scenarios
        self.weights = [s.weight for s in plan.scenarios]
        self.base_model = base_model
        self.prompts = {s.name: read_prompts(s.prompts) for s in plan.scenarios}
        self.recent: dict[str, deque[Ask]] = {s.name: deque(maxlen=RECENT) for s in plan.scenarios}

    def models(self) -> set[str]:
        """The model names the scenarios call (the base model under its served name)."""
        return {self.model_of(s) for s in self.scenarios}

    def model_of(self, scenario: Scenario) -> str:
        return self.base_model if scenario.model == BASE else scenario.model

    def next(self, rng: random.Random) -> Planned:
        scenario = rng.choices(self.scenarios, weights=self.weights)[0]
        recent = self.recent[scenario.name]
        if recent and rng.random() < scenario.repeat:
            return Planned(scenario.name, scenario.model, rng.choice(recent), repeat=True)
        pool = self.prompts[scenario.name]
        text = "\n\n".join(rng.choice(pool) for _ in range(scenario.context))
        ask = Ask(
            model=self.model_of(scenario),
            messages=[("user", scenario.template.replace("{text}", text))],
            max_tokens=scenario.max_tokens,
            temperature=scenario.temperature,
            drafter=scenario.speculative.drafter if scenario.speculative else None,
            draft_tokens=scenario.speculative.num_tokens if scenario.speculative else None,
        )
        recent.append(ask)
        return Planned(scenario.name, scenario.model, ask, repeat=False)
