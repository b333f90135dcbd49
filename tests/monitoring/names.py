"""The names the monitoring files may use, and the expressions they hold.

Series the service exports come from ``ftserve.service.metrics`` itself (every Counter, Gauge, Histogram and
Summary defined there, with the suffixes Prometheus sees), so renaming a metric there breaks the rule and
dashboard tests until the rules and the dashboard follow. Recorded series come from the rule files.
Shared by the rule, dashboard and end-to-end tests.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from prometheus_client import Counter, Gauge, Histogram, Summary

from ftserve.service import metrics
from tests.monitoring.tools import MONITORING

RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "ftserve-dashboard.json"
PROMETHEUS_SERIES = frozenset({"up"})  # made by Prometheus for every target (FtserveDown reads it)

# Suffixes each metric type exposes (multiprocess mode: no _created series).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}

# PromQL words that look like names but are not series.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"inf", "nan", "start", "end"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def known_series() -> set[str]:
    """Every series name the service exports, plus Prometheus' own ``up``."""
    names = set(PROMETHEUS_SERIES)
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram | Summary):
            for family in value.describe():
                names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def _rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", [])
        for rule in group.get("rules", [])
    ]


def recording_rules() -> list[tuple[str, str]]:
    """(record, expr) of every recording rule, in file order."""
    return [(rule["record"], rule["expr"]) for rule in _rules() if "record" in rule]


def recorded_names() -> set[str]:
    return {record for record, _ in recording_rules()}


def alerting_rules() -> list[dict[str, Any]]:
    """Every alerting rule as written (alert, expr, for, labels, annotations)."""
    return [rule for rule in _rules() if "alert" in rule]


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels in order, with those nested in (collapsed) rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    return _panels(dashboard().get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def series_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (metric names of its vector selectors).

    Strings, label matchers, ranges and grouping clauses are removed first; what is left that looks like a
    name and is neither a keyword nor called like a function is a series name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def unknown_names(expr: str, allowed: set[str] | None = None) -> set[str]:
    """Series names in ``expr`` that neither the service exports nor a recording rule records."""
    allowed = known_series() | recorded_names() if allowed is None else allowed
    return series_names(expr) - allowed
