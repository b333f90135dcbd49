"""Every Prometheus metric ftserve exports, in one place.

Names follow vLLM's (with an ``ftserve_`` prefix) and the OpenTelemetry GenAI meanings. BentoML runs
prometheus_client in multiprocess mode and serves these on its ``/metrics``; gauges sum over live workers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ftserve.engine.protocol import EngineStats

REQUEST_LABELS = ("adapter", "protocol")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "ftserve_time_to_first_token_seconds",
    "Time from request arrival to its first generated token.",
    REQUEST_LABELS,
    buckets=_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "ftserve_e2e_request_latency_seconds",
    "Time from request arrival to its last token.",
    REQUEST_LABELS,
    buckets=_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("ftserve_prompt_tokens", "Prompt tokens processed.", REQUEST_LABELS)
GENERATION_TOKENS = Counter("ftserve_generation_tokens", "Tokens generated.", REQUEST_LABELS)
REQUEST_SUCCESS = Counter(
    "ftserve_request_success",
    "Finished requests by finish reason (stop, length, abort, error).",
    (*REQUEST_LABELS, "finished_reason"),
)
NUM_RUNNING = Gauge(
    "ftserve_num_requests_running", "Requests being decoded by the engine.", multiprocess_mode="livesum"
)
NUM_WAITING = Gauge(
    "ftserve_num_requests_waiting", "Requests waiting for a place in the engine.", multiprocess_mode="livesum"
)


def observe_engine(stats: EngineStats) -> None:
    NUM_RUNNING.set(stats.num_running)
    NUM_WAITING.set(stats.num_waiting)


def observe_request(
    adapter: str,
    protocol: str,
    *,
    ttft_s: float | None,
    e2e_s: float,
    prompt_tokens: int,
    generated_tokens: int,
    finish_reason: str,
) -> None:
    labels = {"adapter": adapter, "protocol": protocol}
    if ttft_s is not None:
        TIME_TO_FIRST_TOKEN.labels(**labels).observe(ttft_s)
    E2E_LATENCY.labels(**labels).observe(e2e_s)
    PROMPT_TOKENS.labels(**labels).inc(prompt_tokens)
    GENERATION_TOKENS.labels(**labels).inc(generated_tokens)
    REQUEST_SUCCESS.labels(**labels, finished_reason=finish_reason).inc()
