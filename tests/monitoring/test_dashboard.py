"""The Grafana dashboard, checked structurally (Grafana is not installable here): importable shape, a sane grid,
queries on known series only, PromQL that parses once Grafana's variables are substituted, and a panel for
every topic the service measures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.names import (
    DASHBOARD,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    known_series,
    series_names,
    unknown_names,
)
from tests.monitoring.tools import prometheus_tool

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLES = {"$adapter", "$__rate_interval"}  # what Grafana substitutes in our queries (and the e2e test, too)
GRID_WIDTH = 24

# (keywords one panel title must contain, its unit)
TOPICS: list[tuple[tuple[str, ...], str]] = [
    (("time to first token", "p50", "p95", "p99"), "s"),
    (("inter-token", "p95"), "s"),
    (("end-to-end", "p95", "p99"), "s"),
    (("requests/s", "per adapter"), "reqps"),
    (("tokens/s", "per adapter"), "suffix: tok/s"),
    (("running", "waiting"), "short"),
    (("kv cache",), "percentunit"),
    (("prefix-cache", "hit ratio"), "percentunit"),
    (("response-cache", "hit ratio"), "percentunit"),
    (("speculative", "acceptance"), "percentunit"),
    (("cost per hour",), "currencyUSD"),
    (("cost per 1m",), "currencyUSD"),
    (("availability", "burn rate"), "none"),
    (("ttft", "burn rate"), "none"),
    (("e2e", "burn rate"), "none"),
    (("load failures",), "short"),
    (("residency",), "short"),
]


def substituted(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$adapter", ".*")


def overlapping(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
    )


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard_panels() if panel.get("type") != "row"]


def test_the_dashboard_is_importable_json_with_identity() -> None:
    board = dashboard()  # raises on invalid JSON
    assert isinstance(board["schemaVersion"], int) and 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and len(board["uid"]) <= 40 and board["title"].startswith("ftserve")
    assert DASHBOARD.read_text().endswith("}\n")


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in dashboard_panels()]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))


def test_the_overlap_check_sees_an_overlap() -> None:
    assert overlapping({"x": 0, "y": 0, "w": 12, "h": 8}, {"x": 11, "y": 7, "w": 4, "h": 4})
    assert not overlapping({"x": 0, "y": 0, "w": 12, "h": 8}, {"x": 12, "y": 0, "w": 12, "h": 8})


def test_panels_sit_inside_the_grid_without_overlapping() -> None:
    placed: list[tuple[str, dict[str, int]]] = []
    for panel in dashboard().get("panels", []):  # top level: the panels Grafana lays out together
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        clashes = [title for title, other in placed if overlapping(grid, other)]
        assert not clashes, (panel["title"], clashes)
        placed.append((panel["title"], grid))


def test_every_query_panel_uses_the_datasource_variable_and_has_targets() -> None:
    for panel in query_panels():
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip() and target.get("refId"), panel["title"]
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]


def test_every_query_reads_only_exported_or_recorded_series() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        assert series_names(expr), (title, expr)
        assert not unknown_names(expr), (title, unknown_names(expr))


def test_queries_use_only_known_variables_and_filter_by_adapter() -> None:
    for title, expr in dashboard_exprs():
        assert set(re.findall(r"\$\{?\w+\}?", expr)) <= VARIABLES, (title, expr)
        # Deployment-wide (job:) series have no adapter label; everything else follows the adapter picker.
        if any(not name.startswith("job:") for name in series_names(expr)):
            assert 'adapter=~"$adapter"' in expr, (title, expr)


def test_queries_parse_as_promql_once_variables_are_substituted(tmp_path: Path) -> None:
    # promtool has no query parser of its own in 2.42: each query becomes a recording rule it checks.
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": substituted(expr)}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [str(prometheus_tool("promtool")), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_promtool_rejects_a_broken_query(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rule = {
        "record": "dashboard:broken:check",
        "expr": substituted('sum(rate(x{adapter=~"$adapter"}[$__rate_interval])'),
    }
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [rule]}]}))
    done = subprocess.run(
        [str(prometheus_tool("promtool")), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0


@pytest.mark.parametrize(("keywords", "unit"), TOPICS, ids=[" ".join(keywords) for keywords, _ in TOPICS])
def test_each_topic_has_a_panel_with_its_unit(keywords: tuple[str, ...], unit: str) -> None:
    matching = [p for p in query_panels() if all(word in p["title"].lower() for word in keywords)]
    assert matching, f"no panel titled with {keywords}"
    assert {p["fieldConfig"]["defaults"]["unit"] for p in matching} == {unit}


def test_burn_rate_panels_read_the_recorded_slis() -> None:
    for slo in ("availability_errors", "ttft_slow", "e2e_slow"):
        panels = [title for title, expr in dashboard_exprs() if f"adapter:ftserve_slo_{slo}:ratio_rate" in expr]
        assert any("burn rate" in title.lower() for title in panels), slo


def test_the_datasource_and_adapter_variables_are_defined() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    adapter = variables["adapter"]
    assert adapter["type"] == "query" and adapter["datasource"] == DATASOURCE
    query = adapter["query"]["query"] if isinstance(adapter["query"], dict) else adapter["query"]
    assert query == "label_values(ftserve_request_success_total, adapter)"
    assert adapter["definition"] == query
    metric = re.fullmatch(r"label_values\((\w+), adapter\)", query)
    assert metric and metric[1] in known_series()
    assert adapter["multi"] is True and adapter["includeAll"] is True and adapter["allValue"] == ".*"
