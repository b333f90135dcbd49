"""``ftserve loadtest``: Locust, headless, against a running service; a JSON + markdown report and an SLO verdict.

ftserve loadtest --host http://127.0.0.1:3000 --users 16 --spawn-rate 4 --duration 2m \\
    --slo loadtest/slo.yaml --json loadtest-report.json --markdown loadtest-report.md

Everything is checked before any load: the SLO and scenario files (unknown keys, impossible values), the
prompt files, that the service answers (REST ``/readyz``, gRPC health when gRPC users run) and serves every
model the scenarios call. Exit status: 0 the SLO is met, 1 it is breached, 2 bad settings or no service.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftserve.config import ConfigError
from ftserve.loadtest.prompts import RequestPlan
from ftserve.loadtest.report import RunInfo, markdown, summarize
from ftserve.loadtest.samples import Sample, read_run
from ftserve.loadtest.settings import LoadtestConfig, ScenarioFile, load_scenarios, load_slo

log = logging.getLogger("ftserve.loadtest")
PROBE_TIMEOUT_S = 5.0


def base_model_of(host: str) -> tuple[str, set[str]]:
    """The served base model's name and every model name the service knows; ConfigError if it is not there."""
    try:
        ready = httpx.get(f"{host}/readyz", timeout=PROBE_TIMEOUT_S)
        models = httpx.get(f"{host}/v1/models", timeout=PROBE_TIMEOUT_S) if ready.status_code == 200 else None
    except httpx.HTTPError as exc:
        raise ConfigError(f"no service at {host} ({type(exc).__name__}: {exc}); start it first (make serve)") from None
    if models is None:
        raise ConfigError(f"the service at {host} is not ready (/readyz answered HTTP {ready.status_code})")
    try:
        cards = models.json()["data"]
        names = {card["id"] for card in cards}
        base = next(card["id"] for card in cards if not card.get("parent"))
    except (ValueError, KeyError, TypeError, StopIteration):
        raise ConfigError(f"{host}/v1/models did not answer with an OpenAI model list") from None
    return base, names


def check_grpc(target: str) -> None:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise ConfigError(
            f"no gRPC service at {target} ({exc.code().name}); set --grpc-target, or give grpc weight 0 in the "  # type: ignore[attr-defined]
            "scenario file to test REST alone"
        ) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ConfigError(f"the gRPC service at {target} is not serving (health: {reply.status})")


def preflight(config: LoadtestConfig, scenarios: ScenarioFile) -> str:
    """Everything that would make the run meaningless, checked before any load; returns the base model."""
    base, served = base_model_of(config.host)
    plan = RequestPlan(scenarios, base)  # reads every prompt file
    missing = sorted(plan.models() - served)
    if missing:
        raise ConfigError(
            f"the scenarios call models the service does not serve: {missing}; it serves {sorted(served)}"
        )
    if scenarios.protocols.get("grpc", 0.0) > 0:
        check_grpc(config.grpc_target)
    return base


def run_locust(config: LoadtestConfig, base_model: str) -> tuple[float, list[Sample]]:
    """Locust in its own process (gevent patches it); returns the measured duration and the samples."""
    with tempfile.TemporaryDirectory(prefix="ftserve-loadtest-") as tmp:
        settings, out = Path(tmp) / "settings.json", Path(tmp) / "run.json"
        settings.write_text(json.dumps({"config": config.model_dump(mode="json"), "base_model": base_model}))
        done = subprocess.run([sys.executable, "-m", "ftserve.loadtest.run", str(settings), str(out)], check=False)
        if done.returncode != 0 or not out.exists():
            raise ConfigError(f"the Locust run failed (exit {done.returncode}); see its output above")
        return read_run(out)


def cmd_loadtest(ns: argparse.Namespace, config: LoadtestConfig) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    slo = load_slo(config.slo)
    scenarios = load_scenarios(config.scenarios)
    base = preflight(config, scenarios)
    log.info("load test: %d users for %s against %s (base model %s)", config.users, config.duration, config.host, base)
    duration, samples = run_locust(config, base)
    report = summarize(samples, RunInfo(config.host, config.users, config.spawn_rate, duration), slo)
    text = markdown(report)
    if ns.json_path is not None:
        ns.json_path.write_text(json.dumps(report, indent=2) + "\n")
    if config.markdown is not None:
        config.markdown.write_text(text + "\n")
    else:
        print(text)
    log.info(
        "SLO %s: %d requests, %d failed, p95 TTFT %s ms, p95 E2E %s ms, %.1f tokens/s",
        "met" if report["slo_ok"] else "BREACHED", report["requests"], report["failures"],
        report["p95_ttft_ms"], report["p95_e2e_ms"], report["tokens_per_s"],
    )  # fmt: skip
    return 0 if report["slo_ok"] else 1
