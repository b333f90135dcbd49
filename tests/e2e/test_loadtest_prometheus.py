"""A real Prometheus (Debian's) scraping a real ``bentoml serve`` while ``ftserve loadtest`` drives it with
Locust over REST and gRPC; then every recording rule and every dashboard query is asked of Prometheus' HTTP
API and must answer with data, and every rule must evaluate without error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ftserve.bench.serve_process import free_port, stop
from tests.e2e.conftest import Server
from tests.monitoring.names import alerting_rules, dashboard_exprs, recording_rules
from tests.monitoring.tools import MONITORING, prometheus_tool

pytestmark = pytest.mark.e2e
READY_TIMEOUT_S = 120
DATA_TIMEOUT_S = 90
POLL_S = 0.5  # polling interval while waiting for Prometheus to have scraped / evaluated

# The extract answers are long enough (32 tokens of JSON that copies the order's words) for prompt lookup to
# draft: the speculative-acceptance rules record nothing while no request drafts, and 8 tokens sometimes did not.
SCENARIOS = """
protocols: {rest: 2, grpc: 1}
think_time_s: [0.0, 0.2]
scenarios:
  - {name: route, model: support-router, weight: 2, max_tokens: 8, repeat: 0.5,
     prompts: {inline: ["Route support ticket #1 from Ana: my parcel is late", "Route ticket #2: refund please"]}}
  - {name: extract, model: order-extract, weight: 1, max_tokens: 32, speculative: {drafter: prompt-lookup},
     prompts: {inline: ["Extract the order: 3 units of AB-12 to Lyon", "Extract the order: two X9 to Oslo"]}}
  - {name: chat, model: base, weight: 1, max_tokens: 8, repeat: 0.3,
     prompts: {inline: ["What is the capital of France?"]}}
"""
LENIENT_SLO = "p95_ttft_ms: 600000\np95_e2e_ms: 600000\nmax_error_rate: 0.0\nmin_requests: 5\n"
IMPOSSIBLE_SLO = "p95_ttft_ms: 0.001\np95_e2e_ms: 0.002\nmin_requests: 1\n"
REQUIRED = ("requests", "failures", "p50_ttft_ms", "p95_ttft_ms", "p95_e2e_ms", "tokens_per_s", "slo_ok")


@dataclass(frozen=True)
class Prometheus:
    url: str

    def query(self, expr: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body: dict[str, Any] = reply.json()
        return body

    def query_until_data(self, expr: str, deadline: float) -> dict[str, Any]:
        """The first answer with data (rules evaluate every second), or the last answer at the deadline."""
        while True:
            body = self.query(expr)
            if body.get("status") != "success" or body["data"]["result"] or time.monotonic() > deadline:
                return body
            time.sleep(POLL_S)


def prometheus_config(server: Server, folder: Path) -> Path:
    """The shipped prometheus.yml, pointed at the test's service, scraping and evaluating every second."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str((MONITORING / pattern).resolve()) for pattern in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ftserve"]
    job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    cmd = [
        str(prometheus_tool("prometheus")), f"--config.file={prometheus_config(server, folder)}",
        f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _scraping(prom):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start scraping:\n{log.read_text()[-4000:]}")
            time.sleep(POLL_S)
        yield prom
    finally:
        stop(proc)


def _scraping(prom: Prometheus) -> bool:
    try:
        result = prom.query('up{job="ftserve"} == 1')["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False
    return bool(result)


def loadtest(server: Server, folder: Path, slo: str, users: int, duration: str) -> tuple[int, dict[str, Any], str]:
    (folder / "scenarios.yaml").write_text(SCENARIOS)
    (folder / "slo.yaml").write_text(slo)
    ftserve = Path(sys.executable).with_name("ftserve")
    cmd = [
        str(ftserve), "loadtest", "--host", server.url, "--grpc-target", server.grpc_target, "--users", str(users),
        "--spawn-rate", str(users), "--duration", duration, "--slo", str(folder / "slo.yaml"),
        "--scenarios", str(folder / "scenarios.yaml"), "--json", str(folder / "report.json"),
        "--markdown", str(folder / "report.md"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert (folder / "report.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, json.loads((folder / "report.json").read_text()), (folder / "report.md").read_text()


@pytest.fixture(scope="module")
def load(server: Server, prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rc, report, text = loadtest(server, tmp_path_factory.mktemp("loadtest"), LENIENT_SLO, users=3, duration="20s")
    assert rc == 0, text
    return report


def test_the_load_test_times_every_request_over_both_protocols_and_meets_its_slo(load: dict[str, Any]) -> None:
    assert all(key in load for key in REQUIRED)
    assert load["slo_ok"] is True and load["failures"] == 0 and load["requests"] >= 5
    assert set(load["per_protocol"]) == {"rest", "grpc"}
    assert set(load["per_adapter"]) == {"support-router", "order-extract", "base"}
    assert load["p50_ttft_ms"] <= load["p95_ttft_ms"] <= load["p95_e2e_ms"]
    assert load["tokens_per_s"] > 0 and load["repeats"] > 0


def test_a_breached_slo_fails_the_command(server: Server, tmp_path: Path) -> None:
    rc, report, text = loadtest(server, tmp_path, IMPOSSIBLE_SLO, users=1, duration="4s")
    assert rc == 1 and report["slo_ok"] is False and "## SLO **BREACHED**" in text


def test_every_recording_rule_returns_data(load: dict[str, Any], prometheus: Prometheus) -> None:
    deadline = time.monotonic() + DATA_TIMEOUT_S
    empty = []
    for record, _expr in recording_rules():
        body = prometheus.query_until_data(record, deadline)
        assert body["status"] == "success", (record, body)
        if not body["data"]["result"]:
            empty.append(record)
    assert not empty, f"recording rules without data: {empty}"


def test_every_rule_evaluates_without_error(load: dict[str, Any], prometheus: Prometheus) -> None:
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(recording_rules()) + len(alerting_rules())
    failing = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not failing


def test_every_dashboard_query_returns_data(load: dict[str, Any], prometheus: Prometheus) -> None:
    deadline = time.monotonic() + DATA_TIMEOUT_S
    empty = []
    for title, expr in dashboard_exprs():
        query = expr.replace("$__rate_interval", "1m").replace("$adapter", ".*")
        body = prometheus.query_until_data(query, deadline)
        assert body["status"] == "success", (title, query, body)
        if not body["data"]["result"]:
            empty.append((title, query))
    assert not empty, f"dashboard queries without data: {empty}"
