"""The SLO and scenario files: the shipped ones validate; unknown keys and impossible values are refused
with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftserve.config import ConfigError
from ftserve.loadtest.prompts import RequestPlan, read_prompts
from ftserve.loadtest.settings import LoadtestConfig, load_scenarios, load_slo, parse_duration

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_slo_and_scenarios_validate_and_their_prompts_load() -> None:
    slo = load_slo(ROOT / "loadtest" / "slo.yaml")
    assert slo.p95_ttft_ms < slo.p95_e2e_ms
    plan = load_scenarios(ROOT / "loadtest" / "scenarios.yaml")
    requests = RequestPlan(plan, "the-base")
    assert "the-base" in requests.models() and "support-router" in requests.models()
    assert all(len(prompts) > 0 for prompts in requests.prompts.values())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("p95_ttft_ms: 100\np95_e2e_ms: 1000\np99_latency: 3\n", "p99_latency"),
        ("p95_ttft_ms: -5\np95_e2e_ms: 1000\n", "p95_ttft_ms"),
        ("p95_ttft_ms: 100\np95_e2e_ms: 1000\nmax_error_rate: 1.5\n", "max_error_rate"),
        ("p95_ttft_ms: 5000\np95_e2e_ms: 1000\n", "first token cannot come after the last"),
        ("p95_e2e_ms: 1000\n", "p95_ttft_ms"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("p95_ttft_ms: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_slo_file_is_refused_naming_the_problem(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match="SLO file") as info:
        load_slo(write(tmp_path, text))
    assert named in str(info.value)


def test_a_missing_slo_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_slo(tmp_path / "nope.yaml")


SCENARIO = "scenarios:\n  - {name: a, model: base, prompts: {inline: [hi]}%s}\n"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (SCENARIO % ", colour: red", "colour"),
        (SCENARIO % ", weight: 0", "weight"),
        (SCENARIO % ", repeat: 2", "repeat"),
        (SCENARIO % ", template: no placeholder", "template"),
        ("scenarios: []\n", "scenarios"),
        ("think_time_s: [3, 1]\n" + SCENARIO % "", "think_time_s"),
        ("protocols: {rest: 1, soap: 1}\n" + SCENARIO % "", "soap"),
        ("scenarios:\n  - {name: a, model: base, prompts: {inline: [x], text: y.txt}}\n", "exactly one"),
    ],
)
def test_a_bad_scenario_file_is_refused_naming_the_problem(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match="scenario file") as info:
        load_scenarios(write(tmp_path, text))
    assert named in str(info.value)


def test_prompt_paths_are_relative_to_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("one\n\ntwo\n\n\nthree\n")
    sub = tmp_path / "loadtest"
    sub.mkdir()
    plan = load_scenarios(write(sub, "scenarios:\n  - {name: a, model: base, prompts: {text: ../data/t.txt}}\n"))
    assert read_prompts(plan.scenarios[0].prompts) == ["one", "two", "three"]


def test_a_prompt_file_without_prompts_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    for name, message in (("empty.jsonl", "no prompts"), ("bad.jsonl", "chat record")):
        plan = load_scenarios(write(tmp_path, f"scenarios:\n  - {{name: a, model: x, prompts: {{jsonl: {name}}}}}\n"))
        with pytest.raises(ConfigError, match=message):
            read_prompts(plan.scenarios[0].prompts)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("2m", 120), ("1h30m", 5400), ("45", 45), ("1.5m", 90)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "2 minutes", "m5", "-3s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        LoadtestConfig(duration=text)
