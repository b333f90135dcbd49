"""Turn a run's samples into figures (JSON), an SLO verdict and a markdown report.

Percentiles are over requests (TTFT, end-to-end) or over every gap between streamed chunks (inter-token
latency), computed from the raw client-side samples, not from Locust's rounded histogram. Failed requests
count in ``failures`` and the error rate; latency percentiles are of the requests that succeeded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from ftserve.bench.measure import percentile_ms
from ftserve.loadtest.samples import Sample
from ftserve.loadtest.settings import SloConfig

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class RunInfo:
    host: str
    users: int
    spawn_rate: float
    duration_s: float  # the measured span of the run, first request sent to last answer


def _percentiles(values: list[float], name: str) -> dict[str, float | None]:
    """``p50_<name>_ms`` ... from seconds; None when there is nothing to measure."""
    return {f"p{p}_{name}_ms": percentile_ms(values, p) for p in PERCENTILES}


def figures(samples: list[Sample], duration_s: float) -> dict[str, Any]:
    """Counts, rates and latency percentiles of one group of samples."""
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    out: dict[str, Any] = {
        "requests": len(samples),
        "failures": len(samples) - len(good),
        "error_rate": round((len(samples) - len(good)) / len(samples), 4) if samples else 0.0,
        "requests_per_s": round(len(samples) / duration_s, 3) if duration_s > 0 else 0.0,
        "tokens_per_s": round(tokens / duration_s, 2) if duration_s > 0 else 0.0,
        "completion_tokens": tokens,
        "mean_prompt_tokens": round(float(np.mean([s.prompt_tokens for s in good])), 1) if good else 0.0,
        "mean_completion_tokens": round(float(np.mean([s.completion_tokens for s in good])), 1) if good else 0.0,
        "repeats": sum(s.repeat for s in samples),
    }
    out |= _percentiles([s.ttft_s for s in good if s.ttft_s is not None], "ttft")
    out |= _percentiles([gap for s in good for gap in s.itl_s], "itl")
    out |= _percentiles([s.e2e_s for s in good], "e2e")
    return out


def _grouped(samples: list[Sample], key: str, duration_s: float) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(getattr(s, key), []).append(s)
    return {name: figures(group, duration_s) for name, group in sorted(groups.items())}


def slo_checks(overall: dict[str, Any], slo: SloConfig) -> list[dict[str, Any]]:
    """Each SLO line: the limit, the measured value and whether it holds (a missing value does not)."""

    def at_most(name: str, value: float | None, limit: float) -> dict[str, Any]:
        return {"name": name, "limit": limit, "value": value, "ok": value is not None and value <= limit}

    def at_least(name: str, value: float | None, limit: float) -> dict[str, Any]:
        return {"name": name, "limit": limit, "value": value, "ok": value is not None and value >= limit}

    checks = [
        at_least("requests", overall["requests"], slo.min_requests),
        at_most("p95_ttft_ms", overall["p95_ttft_ms"], slo.p95_ttft_ms),
        at_most("p95_e2e_ms", overall["p95_e2e_ms"], slo.p95_e2e_ms),
        at_most("error_rate", overall["error_rate"], slo.max_error_rate),
    ]
    if slo.p95_itl_ms is not None:
        checks.append(at_most("p95_itl_ms", overall["p95_itl_ms"], slo.p95_itl_ms))
    if slo.min_tokens_per_s is not None:
        checks.append(at_least("tokens_per_s", overall["tokens_per_s"], slo.min_tokens_per_s))
    return checks


def summarize(samples: list[Sample], run: RunInfo, slo: SloConfig) -> dict[str, Any]:
    """The JSON report: overall figures at the top level, then per adapter / protocol / scenario."""
    overall = figures(samples, run.duration_s)
    checks = slo_checks(overall, slo)
    errors = Counter(s.error for s in samples if s.error)
    return {
        **overall,
        "slo_ok": all(c["ok"] for c in checks),
        "slo": checks,
        "run": {"host": run.host, "users": run.users, "spawn_rate": run.spawn_rate, "duration_s": run.duration_s},
        "per_adapter": _grouped(samples, "adapter", run.duration_s),
        "per_protocol": _grouped(samples, "protocol", run.duration_s),
        "per_scenario": _grouped(samples, "scenario", run.duration_s),
        "errors": [{"error": e, "count": n} for e, n in errors.most_common(20)],
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    head = (
        "| | requests | errors | req/s | tok/s | TTFT p50 / p95 / p99 ms | ITL p50 / p95 / p99 ms "
        "| E2E p50 / p95 / p99 ms |"
    )
    lines = [f"### {title}", "", head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in rows.items():
        lat = {kind: " / ".join(_ms(f[f"p{p}_{kind}_ms"]) for p in PERCENTILES) for kind in ("ttft", "itl", "e2e")}
        lines.append(
            f"| {name} | {f['requests']} | {f['failures']} | {f['requests_per_s']:.2f} | {f['tokens_per_s']:.1f} "
            f"| {lat['ttft']} | {lat['itl']} | {lat['e2e']} |"
        )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    verdict = "**met**" if report["slo_ok"] else "**BREACHED**"
    lines = [
        "# Load test report",
        "",
        f"{run['users']} users (spawn rate {run['spawn_rate']:g}/s) against {run['host']} for "
        f"{run['duration_s']:.0f} s: {report['requests']} requests, {report['failures']} failed, "
        f"{report['requests_per_s']:.2f} req/s, {report['tokens_per_s']:.1f} generated tokens/s.",
        "",
        f"## SLO {verdict}",
        "",
        "| check | limit | measured | |",
        "|---|---:|---:|---|",
    ]
    for c in report["slo"]:
        value = "–" if c["value"] is None else f"{c['value']:g}"
        lines.append(f"| {c['name']} | {c['limit']:g} | {value} | {'ok' if c['ok'] else 'BREACH'} |")
    lines += ["", "## Latency and throughput", ""]
    lines += _table("All requests", {"all": report})
    lines += _table("Per adapter", report["per_adapter"])
    lines += _table("Per protocol", report["per_protocol"])
    lines += _table("Per scenario", report["per_scenario"])
    lines += ["TTFT: request sent to first streamed token. ITL: gap between streamed chunks. E2E: request sent "
              "to last token. Percentiles of successful requests, measured by the client.", ""]  # fmt: skip
    if report["errors"]:
        lines += ["## Errors", "", "| count | error |", "|---:|---|"]
        lines += [f"| {e['count']} | {e['error'].replace('|', '/')} |" for e in report["errors"]]
        lines.append("")
    return "\n".join(lines)
