"""One timed request of a load test, and timing a streamed completion client-side.

Locust's own timer stops when a streamed response's headers arrive, so the figures that matter for an LLM
(time to first token, gaps between streamed chunks, time to the last token) are measured here, around the
stream, and kept per request.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftserve.client import Client, ClientError, Completion
from ftserve.loadtest.prompts import Planned


@dataclass
class Sample:
    """What one request came to. Times are seconds; ``start`` counts from the start of the run."""

    scenario: str
    adapter: str
    protocol: str
    start: float
    ok: bool
    e2e_s: float
    ttft_s: float | None = None  # None when no token arrived
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive streamed chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    repeat: bool = False
    error: str | None = None  # "<code>: <message>" of a failed request


def timed_request(client: Client, planned: Planned, protocol: str, run_started: float) -> Sample:
    """Send one streamed request and time it; a failure becomes a failed sample, never an exception."""
    completion = Completion()
    started = time.perf_counter()
    sample = Sample(planned.scenario, planned.adapter, protocol, started - run_started, ok=False, e2e_s=0.0)
    sample.repeat = planned.repeat
    last: float | None = None
    try:
        for _piece in client.stream(planned.ask, completion):
            now = time.perf_counter()
            if last is None:
                sample.ttft_s = now - started
            else:
                sample.itl_s.append(now - last)
            last = now
        sample.ok = completion.finish_reason in ("stop", "length")
        if not sample.ok:
            sample.error = f"stream: ended without a finish reason ({completion.finish_reason!r})"
    except ClientError as exc:
        sample.error = f"{exc.code}: {exc.message}"[:300]
    except Exception as exc:  # a dropped connection, a timeout: the request failed, the run goes on
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    sample.e2e_s = time.perf_counter() - started
    sample.prompt_tokens = completion.prompt_tokens
    sample.completion_tokens = completion.completion_tokens
    sample.cached = completion.cached
    return sample


def write_run(path: Path, duration_s: float, samples: list[Sample]) -> None:
    """A finished run: its measured duration and every request's sample."""
    path.write_text(json.dumps({"duration_s": duration_s, "samples": [asdict(s) for s in samples]}))


def read_run(path: Path) -> tuple[float, list[Sample]]:
    raw = json.loads(path.read_text())
    return float(raw["duration_s"]), [Sample(**s) for s in raw["samples"]]
