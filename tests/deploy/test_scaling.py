"""Autoscaling and monitoring artifacts: the HPA's metrics exist (prometheus-adapter maps them from series the
service exports, with valid PromQL), its targets agree with the SLO and the engine's limits, the scrape configs
produce the job the rules select on, and the BentoCloud config fits BentoML's deployment schema."""

from __future__ import annotations

import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import attr
import yaml
from _bentoml_sdk.service.config import validate as validate_service_config
from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
from bentoml._internal.utils.cattr import bentoml_cattr

from ftserve.config import load_service_config
from ftserve.service import metrics
from tests.deploy import manifests as m
from tests.monitoring import names
from tests.monitoring.tools import MONITORING, prometheus_tool

ROOT = m.ROOT
# The keys prometheus-adapter reads in a rule (kubernetes-sigs/prometheus-adapter docs/config.md and
# docs/externalmetrics.md); anything else is ignored by the adapter, so a typo would pass silently.
ADAPTER_RULE_KEYS = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
ADAPTER_RESOURCE_KEYS = {"overrides", "template", "namespaced"}
TTFT_RECORD = "adapter:ftserve_time_to_first_token_seconds:p95_5m"


def _adapter_config() -> dict[str, Any]:
    configmap = m.find("ConfigMap", "adapter-config")
    loaded: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return loaded


def _hpa_metrics(kind: str) -> list[dict[str, Any]]:
    hpa = m.find("HorizontalPodAutoscaler", "ftserve")
    key = {"Pods": "pods", "External": "external"}[kind]
    return [metric[key] for metric in hpa["spec"]["metrics"] if metric["type"] == kind]


def _rule_series(rule: dict[str, Any]) -> str:
    match = re.fullmatch(r"'?([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}'?", rule["seriesQuery"].strip())
    assert match, f"seriesQuery {rule['seriesQuery']!r} is not `name{{matchers}}`"
    return match.group(1)


def _render(rule: dict[str, Any], matchers: str, group_by: str) -> str:
    """The PromQL the adapter sends for a rule (its Go template filled as the adapter fills it)."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", _rule_series(rule))
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def _quantile_and_window(expr: str) -> tuple[float, str]:
    match = re.search(r"histogram_quantile\(\s*([0-9.]+)\s*,.*\[(\w+)\]", expr, re.DOTALL)
    assert match, f"no histogram_quantile(q, ...[window]) in {expr!r}"
    return float(match.group(1)), match.group(2)


def _quantity(value: str) -> float:
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


# -- HPA <-> prometheus-adapter <-> the service's metrics --------------------------------------------------


def test_every_hpa_metric_is_one_prometheus_adapter_serves() -> None:
    config = _adapter_config()
    assert {x["metric"]["name"] for x in _hpa_metrics("Pods")} == {r["name"]["as"] for r in config["rules"]}
    external = {r["name"]["as"] for r in config["externalRules"]}
    assert {x["metric"]["name"] for x in _hpa_metrics("External")} == external


def test_adapter_rules_read_series_the_service_exports() -> None:
    config = _adapter_config()
    assert set(config) == {"rules", "externalRules"}
    exported = names.known_series()
    for rule in config["rules"] + config["externalRules"]:
        assert set(rule) <= ADAPTER_RULE_KEYS and set(rule["resources"]) <= ADAPTER_RESOURCE_KEYS, rule
        series = _rule_series(rule)
        assert series in exported, f"{series} is not exported by ftserve.service.metrics"
        assert re.search(rule["name"]["matches"], series), f"name.matches does not match {series}"
        query = _render(rule, 'namespace="ns"', "pod")
        assert names.series_names(query) <= exported | names.recorded_names(), query
    # The HPA's two signals, named from the metric objects themselves.
    (queue,) = config["rules"]
    (ttft,) = config["externalRules"]
    assert _rule_series(queue) == metrics.NUM_WAITING.describe()[0].name
    assert _rule_series(ttft) == metrics.TIME_TO_FIRST_TOKEN.describe()[0].name + "_bucket"
    # Pods metrics must map to pods and namespaces; external ones to the HPA's namespace.
    assert queue["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert ttft["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}


def test_latency_metric_is_the_recording_rules_quantile_over_the_same_window() -> None:
    (ttft,) = _adapter_config()["externalRules"]
    recorded = dict(names.recording_rules())[TTFT_RECORD]
    assert _quantile_and_window(ttft["metricsQuery"]) == _quantile_and_window(recorded)
    assert names.series_names(recorded) == {_rule_series(ttft)}


def test_adapter_queries_are_valid_promql(tmp_path: Path) -> None:
    config = _adapter_config()
    rules = [
        {"record": f"check:{i}", "expr": _render(rule, 'namespace="ns",pod=~"a|b"', "pod")}
        for i, rule in enumerate(config["rules"] + config["externalRules"])
    ]
    file = tmp_path / "adapter-queries.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    done = subprocess.run([str(prometheus_tool("promtool")), "check", "rules", str(file)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_targets_sit_below_the_slo_and_the_engine_queue() -> None:
    deployment = load_service_config(m.DEFAULT_DEPLOYMENT)
    (queue,) = _hpa_metrics("Pods")
    (ttft,) = _hpa_metrics("External")
    # Requests past engine.max_queue are refused (429): scale out well before a replica's queue is full.
    assert 0 < _quantity(queue["target"]["averageValue"]) < deployment.engine.max_queue / 2
    slo = yaml.safe_load((ROOT / "loadtest" / "slo.yaml").read_text())
    assert ttft["target"]["type"] == "Value"
    assert 0 < _quantity(ttft["target"]["value"]) < slo["p95_ttft_ms"] / 1000


def test_hpa_scales_up_faster_than_it_scales_down() -> None:
    behavior = m.find("HorizontalPodAutoscaler", "ftserve")["spec"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]
    assert up["policies"] and down["policies"]
    assert max(p["value"] for p in up["policies"] if p["type"] == "Pods") > max(
        p["value"] for p in down["policies"] if p["type"] == "Pods"
    )


# -- scraping: the job the rules and dashboard select on ---------------------------------------------------


def _monitoring_job() -> str:
    (job,) = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    return str(job["job_name"])


def test_servicemonitors_select_one_service_each_and_the_replicas_become_job_ftserve() -> None:
    services = [x for x in m.base() if x.kind == "Service"]
    for monitor in [x for x in m.manifests() if x.kind == "ServiceMonitor"]:
        assert monitor.doc["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor.doc["spec"]
        picked = [s for s in services if m.selects(spec["selector"]["matchLabels"], s.doc["metadata"]["labels"])]
        assert len(picked) == 1, f"{monitor.id} selects {[s.name for s in picked]}"
        ports = {p["name"] for p in picked[0].doc["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        if monitor.name == "ftserve":  # job label = the Service's name unless jobLabel says otherwise
            assert "jobLabel" not in spec and picked[0].name == _monitoring_job()
            assert picked[0].doc["spec"].get("clusterIP") != "None"


def test_scrape_config_keeps_only_the_replicas_metrics_port_as_job_ftserve() -> None:
    # promtool is not used here: Debian's Prometheus is built without Kubernetes service discovery.
    (job,) = yaml.safe_load(m.SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job["job_name"] == _monitoring_job() and job["metrics_path"] == "/metrics"
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    targets = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}

    def kept(labels: dict[str, str], port_name: str) -> bool:
        meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in labels.items()}
        meta["__meta_kubernetes_pod_container_port_name"] = port_name
        return all(
            re.fullmatch(r["regex"], ";".join(meta.get(s, "") for s in r["source_labels"])) is not None for r in keep
        )

    server, router = m.find("Deployment", "ftserve"), m.find("Deployment", "ftserve-router")
    assert kept(m.pod_labels(server), "http")
    assert not kept(m.pod_labels(server), "grpc") and not kept(m.pod_labels(router), "http")
    # prometheus-adapter maps these labels to Kubernetes objects.
    (queue,) = _adapter_config()["rules"]
    assert targets == {"namespace": ["__meta_kubernetes_namespace"], "pod": ["__meta_kubernetes_pod_name"]}
    assert set(queue["resources"]["overrides"]) == set(targets)


# -- BentoCloud --------------------------------------------------------------------------------------------


def _unknown_keys(data: Any, schema: Any, where: str = "") -> list[str]:
    """Keys of ``data`` that the attrs class ``schema`` (BentoML's client schema) has no field for; the
    client's converter ignores them, so a misspelled setting would be dropped without a word."""
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin is typing.Union:
        return _unknown_keys(data, next(a for a in args if a is not type(None)), where)
    if origin is list and isinstance(data, list):
        return [k for i, item in enumerate(data) for k in _unknown_keys(item, args[0], f"{where}[{i}]")]
    if origin is dict and isinstance(data, dict):
        return [k for key, value in data.items() for k in _unknown_keys(value, args[1], f"{where}.{key}")]
    if not (attr.has(schema) and isinstance(data, dict)):
        return []
    hints = typing.get_type_hints(schema)
    unknown = [f"{where}.{key}" for key in data if key not in hints]
    known = [(key, value) for key, value in data.items() if key in hints]
    return unknown + [k for key, value in known for k in _unknown_keys(value, hints[key], f"{where}.{key}")]


def test_bentocloud_config_fits_bentomls_deployment_schema() -> None:
    config = yaml.safe_load(m.BENTOCLOUD.read_text())
    assert _unknown_keys(config, CreateDeploymentSchema) == []
    bentoml_cattr.structure(config, CreateDeploymentSchema)  # what `bentoml deploy -f` does with it
    misspelled = {**config, "services": {"ftserve": {"scalling": {"min_replicas": 1}}}}
    assert _unknown_keys(misspelled, CreateDeploymentSchema) == [".services.ftserve.scalling"]


def test_bentocloud_config_targets_the_service_and_scales_on_its_batch_size() -> None:
    config = yaml.safe_load(m.BENTOCLOUD.read_text())
    ((name, service),) = config["services"].items()
    assert name == m.bentoml_service()["name"]
    overrides = service["config_overrides"]
    assert validate_service_config(overrides) == overrides  # BentoML drops keys it does not know
    deployment = load_service_config(m.DEFAULT_DEPLOYMENT)
    assert overrides["traffic"]["concurrency"] == deployment.engine.max_num_seqs
    assert 1 <= service["scaling"]["min_replicas"] <= service["scaling"]["max_replicas"]
