"""The cost report: the math against the formulas computed here, input forms, errors, markdown, chart, CLI."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftserve.config import HARDWARE_USD_PER_HOUR, ConfigError
from ftserve.report.cli import add_cost_command
from ftserve.report.cost import (
    MAX_WINDOWS,
    CostReport,
    Deployment,
    break_even,
    count,
    read_throughput,
    render_markdown,
    usd,
)
from ftserve.report.prices import DEFAULT_PRICES_FILE, ApiPrice, load_price_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def deployment(**overrides: Any) -> Deployment:
    """100 tokens/s at $3.60/h and full utilization: $10 per 1M output tokens; C = 86,400 queries/day."""
    values: dict[str, Any] = {
        "hardware": "test-box",
        "usd_per_hour": 3.6,
        "tokens_per_s": 100.0,
        "utilization": 1.0,
        "input_tokens_per_query": 300.0,
        "output_tokens_per_query": 100.0,
        "source": "test",
    }
    return Deployment(**{**values, **overrides})


def api_at(per_query: float, d: Deployment) -> ApiPrice:
    """An API billing only output tokens, priced to cost ``per_query`` dollars for ``d``'s query."""
    return ApiPrice(usd_per_1m_input=0.0, usd_per_1m_output=per_query / d.output_tokens_per_query * 1e6)


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data), encoding="utf-8")
    return path


# -- the math ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens_per_s", "usd_per_hour", "utilization"), [(100, 3.6, 1.0), (100, 3.6, 0.5), (7, 2.0, 0.6)]
)
def test_self_hosted_price_per_million_output_tokens_follows_the_formula(
    tokens_per_s: float, usd_per_hour: float, utilization: float
) -> None:
    d = deployment(tokens_per_s=tokens_per_s, usd_per_hour=usd_per_hour, utilization=utilization)
    expected = usd_per_hour / (tokens_per_s * utilization * 3600) * 1e6
    assert d.usd_per_1m_output_tokens == pytest.approx(expected)
    assert d.usd_per_query == pytest.approx(expected * 100 / 1e6)
    assert d.usd_per_1m_total_tokens == pytest.approx(expected * 100 / 400)


def test_one_hundred_tokens_per_second_at_three_sixty_an_hour_is_ten_dollars_per_million() -> None:
    assert deployment().usd_per_1m_output_tokens == pytest.approx(10.0)
    assert deployment(utilization=0.5).usd_per_1m_output_tokens == pytest.approx(20.0)


def test_replicas_step_up_past_each_replicas_capacity_and_never_drop_below_one() -> None:
    d = deployment(utilization=0.5)
    capacity = 100 * 0.5 * 86_400 / 100
    assert d.queries_per_day_per_replica == pytest.approx(capacity)
    for q, replicas in [(0, 1), (1, 1), (capacity, 1), (capacity + 1, 2), (2 * capacity, 2), (10 * capacity + 1, 11)]:
        assert d.replicas(q) == replicas, q
        assert d.usd_per_day(q) == pytest.approx(replicas * 3.6 * 24)


def test_api_cost_per_day_bills_input_and_output_tokens() -> None:
    d = deployment()
    api = ApiPrice(usd_per_1m_input=1.0, usd_per_1m_output=2.0)
    per_query = (300 * 1.0 + 100 * 2.0) / 1e6
    assert d.api_usd_per_query(api) == pytest.approx(per_query)
    report = CostReport(d, {"x": api}, [1_000, 50_000])
    assert [r["api_usd_per_day"]["x"] for r in report.rows()] == pytest.approx([1_000 * per_query, 50_000 * per_query])


def test_break_even_is_where_one_replica_costs_what_the_api_does() -> None:
    d = deployment()
    b = break_even(d, "x", api_at(6e-3, d))
    assert b.queries_per_day == pytest.approx(3.6 * 24 / 6e-3)
    assert b.queries_per_day < d.queries_per_day_per_replica
    assert d.usd_per_day(b.queries_per_day) == pytest.approx(b.queries_per_day * 6e-3)
    assert b.api_cheaper_window_count == 0


def test_an_api_cheaper_than_the_marginal_cost_is_never_beaten() -> None:
    d = deployment()  # marginal cost D / C = 86.4 / 86,400 = $0.001 per query
    b = break_even(d, "x", api_at(5e-4, d))
    assert b.queries_per_day is None
    assert b.one_replica_queries_per_day == pytest.approx(86.4 / 5e-4)
    assert b.one_replica_queries_per_day > d.queries_per_day_per_replica
    assert break_even(d, "free", api_at(0.0, d)).one_replica_queries_per_day is None


def test_the_api_wins_again_just_after_a_replica_is_added_while_the_new_one_is_idle() -> None:
    d = deployment()
    b = break_even(d, "x", api_at(1.5e-3, d))  # 1.5x the marginal cost
    capacity, daily = 86_400.0, 86.4
    assert b.api_cheaper_window_count == 1
    ((lo, hi),) = b.api_cheaper_windows
    assert lo == pytest.approx(capacity)
    assert hi == pytest.approx(2 * daily / 1.5e-3)
    assert d.usd_per_day(lo + 1) > (lo + 1) * 1.5e-3 and d.usd_per_day(hi + 1) < (hi + 1) * 1.5e-3


@pytest.mark.parametrize("ratio", [0.5, 0.99, 1.0, 1.15, 1.5, 3.0, 20.0])
def test_break_even_and_windows_match_a_brute_force_scan(ratio: float) -> None:
    d = deployment(utilization=0.7)
    per_query = ratio * d.usd_per_query  # ratio x the self-hosted marginal cost
    b = break_even(d, "x", api_at(per_query, d))
    capacity = d.queries_per_day_per_replica
    # Every listed window lies below (MAX_WINDOWS + 1) replicas; stay off the exact step edges.
    scan = [capacity * (k + 0.5) / 997 for k in range(997 * (MAX_WINDOWS + 1))]
    for q in scan:
        self_cheaper = d.usd_per_day(q) < q * per_query
        if b.queries_per_day is None:
            expected = False
        else:
            expected = q > b.queries_per_day and not any(lo < q < hi for lo, hi in b.api_cheaper_windows)
        assert self_cheaper == expected, (ratio, q)


def test_deployment_refuses_bad_numbers() -> None:
    for bad in ({"tokens_per_s": 0.0}, {"utilization": 0.0}, {"utilization": 1.5}, {"usd_per_hour": -1.0}):
        with pytest.raises(ConfigError):
            deployment(**bad)


# -- prices ------------------------------------------------------------------------------------------


def test_shipped_price_table_has_apis_and_takes_hardware_prices_from_config() -> None:
    table = load_price_table(DEFAULT_PRICES_FILE)
    assert {"api-small", "api-mid", "api-large"} <= set(table.apis)
    assert table.hardware_prices() == HARDWARE_USD_PER_HOUR
    assert table.usd_per_hour("cpu") == HARDWARE_USD_PER_HOUR["cpu"]


def test_price_file_overrides_and_extends_hardware_rows(tmp_path: Path) -> None:
    apis = {"a": {"usd_per_1m_input": 1, "usd_per_1m_output": 2}}
    table = load_price_table(write(tmp_path / "p.yaml", {"apis": apis, "hardware": {"cpu": 0.25, "my-box": 1.1}}))
    assert table.usd_per_hour("cpu") == 0.25
    assert table.usd_per_hour("my-box") == 1.1
    assert table.usd_per_hour("t4") == HARDWARE_USD_PER_HOUR["t4"]
    with pytest.raises(ConfigError, match=r"unknown hardware 'nope'.*my-box"):
        table.usd_per_hour("nope")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"apis": {"a": {"usd_per_1m_input": 1, "usd_per_1m_output": 2}}, "gpus": {}}, "gpus"),
        ({"apis": {"a": {"usd_per_1m_input": 1, "usd_per_1m_output": 2, "usd_per_call": 1}}}, "usd_per_call"),
        ({"apis": {"a": {"usd_per_1m_input": -1, "usd_per_1m_output": 2}}}, "usd_per_1m_input"),
        ({"apis": {}}, "apis"),
        ({"apis": {"a": {"usd_per_1m_input": 1, "usd_per_1m_output": 2}}, "hardware": {"cpu": 0}}, "cpu"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_bad_price_files_raise_config_errors_naming_file_and_key(tmp_path: Path, data: Any, match: str) -> None:
    path = write(tmp_path / "prices.yaml", data)
    with pytest.raises(ConfigError, match=match) as info:
        load_price_table(path)
    assert str(path) in str(info.value)


# -- throughput files --------------------------------------------------------------------------------


LOADTEST = {
    "tokens_per_s": 42.5,
    "requests_per_s": 0.4,
    "requests": 120,
    "failures": 2,
    "mean_completion_tokens": 110.0,
    "mean_prompt_tokens": 260.0,
}


def test_reads_a_loadtest_file_with_its_query_sizes(tmp_path: Path) -> None:
    path = write(tmp_path / "lt.json", LOADTEST)
    t = read_throughput(path)
    assert (t.tokens_per_s, t.output_tokens_per_query, t.input_tokens_per_query) == (42.5, 110.0, 260.0)
    assert str(path) in t.source and "120 requests" in t.source and "2 failures" in t.source


@pytest.mark.parametrize("key", ["tokens_per_s", "output_tokens_per_s"])
def test_reads_the_fastest_native_row_of_a_bench_file(tmp_path: Path, key: str) -> None:
    rows = [
        {"engine": "native", "scenario": "single", key: 50.0},
        {"engine": "native", "scenario": "batch-16", key: 80.0},
        {"engine": "hf-generate", "scenario": "batch-16", key: 200.0},
        {"engine": "native", "scenario": "adapters", "skipped": "no adapters"},
    ]
    t = read_throughput(write(tmp_path / "bench.json", rows))
    assert t.tokens_per_s == 80.0
    assert "native/batch-16" in t.source
    assert t.output_tokens_per_query is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({**LOADTEST, "tokens_per_s": 0}, "tokens_per_s must be > 0"),
        ({"requests": 3}, "without the key 'tokens_per_s'"),
        (42, "neither form"),
        ([], "neither form"),
        (["a", "b"], "neither form"),
        ([{"engine": "hf-generate", "scenario": "s", "tokens_per_s": 5}], "no measured row of engine 'native'"),
        ([{"engine": "native", "scenario": "s", "ttft_p50_ms": 5}], "none of the keys"),
        ([{"engine": "native", "tokens_per_s": 5}], "lacks"),
        ([{"engine": "native", "scenario": "s", "tokens_per_s": "fast"}], "must be a number"),
    ],
)
def test_bad_throughput_files_raise_config_errors_naming_the_file(tmp_path: Path, data: Any, match: str) -> None:
    path = write(tmp_path / "in.json", data)
    with pytest.raises(ConfigError, match=match) as info:
        read_throughput(path)
    assert str(path) in str(info.value)


def test_unreadable_and_non_json_throughput_files_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_throughput(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        read_throughput(tmp_path / "bad.json")


# -- markdown and chart ------------------------------------------------------------------------------


def small_report() -> CostReport:
    apis = {
        "cheap": ApiPrice(usd_per_1m_input=0.0, usd_per_1m_output=5.0),  # $0.0005/query: never beaten
        "dear": ApiPrice(usd_per_1m_input=10.0, usd_per_1m_output=30.0),  # $0.006/query
    }
    return CostReport(deployment(), apis, [1_000, 100_000, 1_000_000], price_source="test", api_source="test")


def test_markdown_has_inputs_price_table_rows_and_break_evens() -> None:
    report = small_report()
    text = render_markdown(report)
    assert "$10.00 per 1M output tokens" in text
    assert "| cheap $/day | dear $/day |" in text
    for q in (1_000, 100_000, 1_000_000):
        replicas = max(1, math.ceil(q / 86_400))
        cells = [count(q), str(replicas), usd(replicas * 86.4), usd(q * 5e-4), usd(q * 6e-3)]
        assert "| " + " | ".join(cells) + " |" in text, q
    assert f"| dear | $10.00 | $30.00 | $0.006 | {count(86.4 / 6e-3)} |" in text
    assert "| cheap |" in text and "never cheaper on this hardware" in text
    assert "## How this is computed" in text


def test_chart_is_a_readable_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from ftserve.report.chart import write_chart

    path = tmp_path / "out" / "cost.png"
    write_chart(small_report(), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels.std() > 0.05  # not a blank canvas


def test_the_report_package_does_not_import_matplotlib_until_a_chart_is_drawn() -> None:
    code = "import sys, ftserve.report.cli, ftserve.report.cost; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- the command -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ftserve")
    add_cost_command(root.add_subparsers(dest="group", required=True))
    return root


def prices_file(tmp_path: Path) -> Path:
    apis = {"dear": {"usd_per_1m_input": 10.0, "usd_per_1m_output": 30.0}}
    return write(tmp_path / "prices.yaml", {"apis": apis, "hardware": {"bench-box": 3.6}})


def run(*argv: str) -> int:
    ns = parser().parse_args(["cost", *argv])
    return int(ns.func(ns))


def test_cost_command_writes_markdown_png_and_json_from_a_loadtest_file(tmp_path: Path) -> None:
    lt = write(tmp_path / "lt.json", {**LOADTEST, "tokens_per_s": 100.0, "mean_completion_tokens": 100.0})
    md, png, js = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "r.json"
    argv = ["--from", str(lt), "--prices", str(prices_file(tmp_path)), "--hardware", "bench-box"]
    argv += ["--utilization", "1", "--queries-per-day", "200000,1000", "--markdown", str(md), "--png", str(png)]
    assert run(*argv, "--json", str(js)) == 0
    text = md.read_text(encoding="utf-8")
    assert "$10.00 per 1M output tokens" in text
    assert "260 input + 100 output" in text
    per_query = (260 * 10 + 100 * 30) / 1e6
    assert f"| 200,000 | 3 | {usd(3 * 86.4)} | {usd(200_000 * per_query)} |" in text
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    data = json.loads(js.read_text(encoding="utf-8"))
    assert [r["queries_per_day"] for r in data["rows"]] == [1_000, 200_000]
    assert data["break_even"][0]["queries_per_day"] == pytest.approx(86.4 / per_query)


def test_cost_command_flags_beat_file_values_and_stdout_is_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tokens-per-s", "120", "--prices", str(prices_file(tmp_path)), "--usd-per-hour", "7.2"]
    assert run(*argv, "--output-tokens-per-query", "60", "--input-tokens-per-query", "0") == 0
    out = capsys.readouterr().out
    expected = 7.2 / (120 * 0.6 * 3600) * 1e6
    assert f"{usd(expected)} per 1M output tokens" in out
    assert "0 input + 60 output" in out and "--usd-per-hour" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens-per-s", "0"],
        ["--tokens-per-s", "10", "--utilization", "1.5"],
        ["--tokens-per-s", "10", "--queries-per-day", "1000,-5"],
        ["--tokens-per-s", "10", "--hardware", "no-such-gpu"],
        ["--tokens-per-s", "10", "--prices", "/nonexistent/prices.yaml"],
    ],
)
def test_cost_command_bad_input_is_a_config_error(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        run(*argv)


def test_cost_command_takes_exactly_one_throughput_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["cost", "--from", "x.json", "--tokens-per-s", "5"])
    with pytest.raises(SystemExit):
        parser().parse_args(["cost"])
