"""The Prometheus config and rules: promtool accepts them and their unit tests pass, and every name they use
is a metric the service exports or a series a rule records."""

from __future__ import annotations

import re
import subprocess
from collections import Counter as Tally
from pathlib import Path

import pytest
import yaml
from prometheus_client import Histogram
from prometheus_client.utils import floatToGoString

from ftserve.loadtest.settings import load_slo
from ftserve.service import metrics
from tests.monitoring.names import (
    RULE_FILES,
    alerting_rules,
    known_series,
    recorded_names,
    recording_rules,
    series_names,
    unknown_names,
)
from tests.monitoring.tools import MONITORING, ROOT, prometheus_tool

SLOS = {"availability", "ttft", "e2e"}
BURN_WINDOWS = {("page", "1h"), ("page", "6h"), ("ticket", "1d"), ("ticket", "3d")}
SLI_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
RECORD_NAME = re.compile(r"^(?P<level>adapter|job):(?P<metric>ftserve_[a-z0-9_]+):(?P<operation>[a-z0-9_]+)$")
WINDOW = re.compile(r"(?:rate|_)(?P<window>\d+[smhd])$")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(prometheus_tool("promtool")), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def relative(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


# -- promtool ------------------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_finds_both_rule_files() -> None:
    done = promtool("check", "config", "monitoring/prometheus.yml")
    output = done.stdout + done.stderr
    # A rule_files glob that matches nothing is not an error for promtool: check it found the rules.
    assert "ftserve-recording.yml" in output and "ftserve-alerts.yml" in output, output


def test_promtool_accepts_every_rule_file() -> None:
    assert {path.name for path in RULE_FILES} >= {"ftserve-recording.yml", "ftserve-alerts.yml"}
    promtool("check", "rules", *relative(RULE_FILES))


def test_promtool_rule_unit_tests_pass() -> None:
    tests = sorted((MONITORING / "tests").glob("*.yml"))
    assert len(tests) >= 3, tests
    done = promtool("test", "rules", *relative(tests))
    assert done.stdout.count("SUCCESS") == len(tests), done.stdout


# -- scrape config -------------------------------------------------------------------------------------


def test_the_config_scrapes_the_service_as_job_ftserve_and_loads_the_rules() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "15s" and config["global"]["evaluation_interval"] == "15s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ftserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [target for group in job["static_configs"] for target in group["targets"]] == ["127.0.0.1:3000"]
    loaded = {path for pattern in config["rule_files"] for path in (MONITORING / "prometheus.yml").parent.glob(pattern)}
    assert loaded == set(RULE_FILES)


# -- names ---------------------------------------------------------------------------------------------


def test_series_names_finds_selectors_and_ignores_labels_functions_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (adapter, le) (rate(ftserve_time_to_first_token_seconds_bucket{le="2.5", '
        'adapter=~"$adapter"}[$__rate_interval]))) > 1e6 and on (adapter) adapter:x:rate5m offset 1h or up == bool 0'
    )
    assert series_names(expr) == {"ftserve_time_to_first_token_seconds_bucket", "adapter:x:rate5m", "up"}


def test_a_renamed_metric_is_reported_as_unknown() -> None:
    expr = "sum by (adapter) (rate(ftserve_prompt_tokens_total[5m])) / sum(rate(ftserve_prompt_token_total[5m]))"
    assert unknown_names(expr) == {"ftserve_prompt_token_total"}
    assert unknown_names("adapter:ftserve_nothing:rate5m > 0") == {"adapter:ftserve_nothing:rate5m"}


def test_known_series_carry_the_suffixes_prometheus_sees() -> None:
    known = known_series()
    assert {"ftserve_prompt_tokens_total", "ftserve_time_to_first_token_seconds_bucket", "up"} <= known
    assert {"ftserve_kv_cache_usage_perc", "ftserve_e2e_request_latency_seconds_count"} <= known
    assert "ftserve_prompt_tokens" not in known and "ftserve_kv_cache_usage_perc_total" not in known


def test_recording_rules_read_only_exported_series_or_earlier_records() -> None:
    allowed = known_series()
    for record, expr in recording_rules():
        assert not unknown_names(expr, allowed), (record, unknown_names(expr, allowed))
        assert series_names(expr), record  # reads something
        allowed.add(record)


def test_alerts_read_only_exported_series_or_recorded_ones() -> None:
    for rule in alerting_rules():
        assert series_names(rule["expr"]), rule["alert"]
        assert not unknown_names(rule["expr"]), (rule["alert"], unknown_names(rule["expr"]))


def test_records_are_unique_and_named_level_metric_operation() -> None:
    records = [record for record, _ in recording_rules()]
    assert [name for name, count in Tally(records).items() if count > 1] == []
    for record, expr in recording_rules():
        match = RECORD_NAME.match(record)
        assert match, record
        # The level is what the rule keeps: `adapter:` rules aggregate by adapter, `job:` rules by job.
        assert re.search(rf"\bby \({match['level']}\b", expr), (record, expr)


def test_windowed_records_use_the_window_in_their_name() -> None:
    windowed = 0
    for record, expr in recording_rules():
        match = WINDOW.search(record)
        if match is None:
            continue
        windowed += 1
        ranges = set(re.findall(r"\[([^\]]+)\]", expr))
        assert ranges == {match["window"]}, (record, ranges)
    assert windowed >= 50


def test_every_slo_has_an_sli_per_window_and_level() -> None:
    records = recorded_names()
    for sli in ("availability_errors", "ttft_slow", "e2e_slow"):
        for level in ("adapter", "job"):
            missing = {w for w in SLI_WINDOWS if f"{level}:ftserve_slo_{sli}:ratio_rate{w}" not in records}
            assert not missing, (sli, level, missing)


def _bucket_bounds(histogram: Histogram) -> set[str]:
    """The ``le`` labels the histogram exports, read from a probe series that is removed again."""
    probe = ("__monitoring_test__",) * len(metrics.REQUEST_LABELS)
    histogram.labels(*probe)
    try:
        return {
            sample.labels["le"]
            for family in histogram.collect()
            for sample in family.samples
            if sample.name.endswith("_bucket") and sample.labels.get("adapter") == probe[0]
        }
    finally:
        histogram.remove(*probe)


SLO = load_slo(ROOT / "loadtest" / "slo.yaml")


@pytest.mark.parametrize(
    ("histogram", "threshold"),
    [
        (metrics.TIME_TO_FIRST_TOKEN, floatToGoString(SLO.p95_ttft_ms / 1000)),
        (metrics.E2E_LATENCY, floatToGoString(SLO.p95_e2e_ms / 1000)),
    ],
    ids=["ttft", "e2e"],
)
def test_latency_slo_thresholds_are_the_load_test_slo_and_bucket_bounds(histogram: Histogram, threshold: str) -> None:
    # The alerts judge the same latencies as the shipped load-test SLO. A threshold that is not a bucket
    # bound (or is spelled "20" instead of "20.0") selects nothing, and the SLI then silently has no samples:
    # the alerts could never fire.
    bucket = f"{histogram.describe()[0].name}_bucket"
    pattern = re.compile(rf'{bucket}\{{le="([^"]+)"\}}')
    used = {le for _, expr in recording_rules() for le in pattern.findall(expr)}
    assert used == {threshold}
    assert threshold in _bucket_bounds(histogram)


# -- alerts --------------------------------------------------------------------------------------------


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    alerts = alerting_rules()
    assert alerts
    for rule in alerts:
        assert rule.get("labels", {}).get("severity") in {"page", "ticket"}, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip() and annotations.get("description", "").strip(), rule["alert"]


def test_burn_rate_alerts_cover_every_slo_with_two_pages_and_two_tickets() -> None:
    windows: dict[str, set[tuple[str, str]]] = {}
    for rule in alerting_rules():
        labels = rule.get("labels", {})
        if "slo" in labels:
            windows.setdefault(labels["slo"], set()).add((labels["severity"], labels["window"]))
            assert "{{ $labels.adapter }}" in rule["annotations"]["summary"], rule["alert"]
            assert "$value" in rule["annotations"]["description"], rule["alert"]
    assert windows == dict.fromkeys(SLOS, BURN_WINDOWS)


def test_the_engine_and_target_alerts_exist() -> None:
    names = {rule["alert"] for rule in alerting_rules()}
    assert {"FtserveQueueGrowing", "FtserveKVCacheSaturated", "FtserveAdapterLoadFailures", "FtserveDown"} <= names
    (down,) = [rule for rule in alerting_rules() if rule["alert"] == "FtserveDown"]
    assert 'up{job="ftserve"}' in down["expr"]
