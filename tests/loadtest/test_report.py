"""Figures, SLO verdicts and the markdown report, from samples built here."""

from __future__ import annotations

import numpy as np
import pytest

from ftserve.loadtest.report import RunInfo, figures, markdown, summarize
from ftserve.loadtest.samples import Sample, read_run, write_run
from ftserve.loadtest.settings import SloConfig

REQUIRED = ("requests", "failures", "p50_ttft_ms", "p95_ttft_ms", "p95_e2e_ms", "tokens_per_s", "slo_ok")


def sample(i: int, adapter: str = "a", ok: bool = True, protocol: str = "rest") -> Sample:
    return Sample(
        scenario=f"s-{adapter}", adapter=adapter, protocol=protocol, start=float(i), ok=ok,
        e2e_s=1.0 + i / 100, ttft_s=0.1 + i / 1000 if ok else None, itl_s=[0.01 * (1 + i % 3)] * 4,
        prompt_tokens=20, completion_tokens=5 if ok else 0, error=None if ok else "429: queue full",
    )  # fmt: skip


def test_figures_are_percentiles_of_the_successful_requests_and_rates_over_the_run() -> None:
    samples = [sample(i) for i in range(100)] + [sample(100 + i, ok=False) for i in range(4)]
    f = figures(samples, duration_s=50.0)
    ttft_ms = [(0.1 + i / 1000) * 1000 for i in range(100)]
    assert f["requests"] == 104 and f["failures"] == 4
    assert f["error_rate"] == pytest.approx(4 / 104, abs=1e-4)
    assert f["p95_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, 95), abs=0.01)
    assert f["p50_e2e_ms"] == pytest.approx(np.percentile([(1 + i / 100) * 1000 for i in range(100)], 50), abs=0.01)
    assert f["p99_itl_ms"] == pytest.approx(30.0)
    assert f["tokens_per_s"] == pytest.approx(500 / 50.0)
    assert f["requests_per_s"] == pytest.approx(104 / 50.0)


def test_percentiles_are_absent_not_zero_when_nothing_succeeded() -> None:
    f = figures([sample(0, ok=False)], duration_s=1.0)
    assert f["p95_ttft_ms"] is None and f["p95_e2e_ms"] is None and f["failures"] == 1


def slo(**kw: float) -> SloConfig:
    return SloConfig.model_validate({"p95_ttft_ms": 500, "p95_e2e_ms": 5000, "max_error_rate": 0.05} | kw)


def run() -> RunInfo:
    return RunInfo("http://127.0.0.1:1", users=4, spawn_rate=2, duration_s=50.0)


def test_the_slo_is_met_only_when_every_check_holds() -> None:
    samples = [sample(i, adapter="a" if i % 2 else "b", protocol="grpc" if i % 4 == 0 else "rest") for i in range(100)]
    report = summarize(samples, run(), slo())
    assert all(k in report for k in REQUIRED) and report["slo_ok"] is True
    assert set(report["per_adapter"]) == {"a", "b"} and set(report["per_protocol"]) == {"grpc", "rest"}
    assert report["per_adapter"]["a"]["requests"] == 50
    tight = summarize(samples, run(), slo(p95_ttft_ms=150))  # measured p95 is ~194 ms
    assert tight["slo_ok"] is False
    assert [c["name"] for c in tight["slo"] if not c["ok"]] == ["p95_ttft_ms"]


def test_errors_and_too_few_requests_breach_the_slo() -> None:
    failing = [sample(i) for i in range(90)] + [sample(90 + i, ok=False) for i in range(10)]
    report = summarize(failing, run(), slo())
    assert not report["slo_ok"] and report["errors"] == [{"error": "429: queue full", "count": 10}]
    few = summarize([sample(i) for i in range(3)], run(), slo(min_requests=10))
    assert not few["slo_ok"]
    assert summarize([], run(), slo())["slo_ok"] is False  # no requests is no verdict, never a pass


def test_optional_checks_join_the_verdict_when_set() -> None:
    samples = [sample(i) for i in range(100)]
    assert not summarize(samples, run(), slo(p95_itl_ms=20))["slo_ok"]
    assert not summarize(samples, run(), slo(min_tokens_per_s=11))["slo_ok"]
    assert summarize(samples, run(), slo(p95_itl_ms=40, min_tokens_per_s=9))["slo_ok"]


def test_the_markdown_states_the_verdict_and_per_adapter_rows() -> None:
    samples = [sample(i, adapter="router") for i in range(60)] + [sample(60, adapter="router", ok=False)]
    text = markdown(summarize(samples, run(), slo(max_error_rate=0.0)))
    assert "## SLO **BREACHED**" in text and "| error_rate | 0 |" in text
    assert "| router | 61 | 1 |" in text and "429: queue full" in text


def test_a_run_round_trips_through_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    samples = [sample(i) for i in range(3)]
    write_run(tmp_path / "run.json", 12.5, samples)
    assert read_run(tmp_path / "run.json") == (12.5, samples)
