"""``ftserve bench soak``: the default deployment under steady load for a long run (10 minutes by default),
reporting memory growth and errors.

It starts its own ``bentoml serve`` (the default deployment, as ``make serve`` runs it), drives it with the
load test's Locust users, and samples the memory of the server's whole process tree every few seconds: its
anonymous memory (heap; what a leak grows) and its whole resident set. The first minutes are warm-up
(caches fill, the allocator settles) and are left out.

Growth is judged on the floor of memory: a low percentile over the first and over the last ``window`` of
the run after warm-up. Resident memory is the live set plus freed heap the allocator has not yet handed
back (the engine trims it every few seconds, see ``engine.heap``); that part only ever adds, and here it
swings by up to ~190 MB within a minute while what is allocated holds still (over one soak glibc's in-use
bytes stayed between 542 and 588 MB; heaptrack, attached for 8 minutes of load, found 21 MB not freed at
the end, 19.5 MB of it from one tensor-indexing site). A leak raises the floor as much as the top, so the
floor shows it; a median of a few samples at each end, judged before, swung from -26 to +85 MB between two runs
whose floors grew 14 and 9 MB. The median growth and a least-squares slope are reported beside it.
Rows:

- ``{"engine": "native", "scenario": "soak", "requests", "failures", "anon_mb_start", "anon_mb_end",
  "anon_growth_mb", "anon_median_growth_mb", "anon_slope_mb_per_min", "rss_mb_start", ..., "steady_growth"}``
  plus the load test's latency figures;
- one ``{"scenario": "soak-memory", "t_s", "anon_mb", "rss_mb"}`` row per memory sample.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftserve.bench.serve_process import bentoml_serve
from ftserve.loadtest.cli import preflight, run_locust
from ftserve.loadtest.report import RunInfo, summarize
from ftserve.loadtest.settings import LoadtestConfig, load_scenarios, load_slo, parse_duration

log = logging.getLogger(__name__)

FLOOR_PERCENTILE = 10  # of a window's samples: its memory floor
MIN_WINDOW_SAMPLES = 4


class SoakBenchConfig(BaseModel):
    """Settings of ``ftserve bench soak``; the CLI options are generated from these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration: str = Field("10m", description="Load duration: 10m, 1h.")
    warmup: str = Field("2m", description="Leading part of the run left out of the memory trend.")
    users: int = Field(16, ge=1, le=1000, description="Concurrent simulated users (steady load).")
    scenarios: Path = Field(Path("loadtest/scenarios.yaml"), description="Request mix.")
    slo: Path = Field(Path("loadtest/slo.yaml"), description="SLO the run is also judged against.")
    sample_every_s: float = Field(5.0, gt=0, description="Seconds between memory samples.")
    window: str = Field("2m", description="First / last part of the run after warm-up whose memory floors give growth.")
    max_growth_mb: float = Field(64.0, gt=0, description="Growth of the memory floor (end - start) allowed, in MB.")

    @model_validator(mode="after")
    def _durations(self) -> SoakBenchConfig:
        warmup, duration = parse_duration(self.warmup), parse_duration(self.duration)
        if warmup >= duration:
            raise ValueError(f"warmup ({self.warmup}) must be shorter than duration ({self.duration})")
        if 2 * parse_duration(self.window) > duration - warmup:
            raise ValueError(f"two {self.window} windows do not fit in {self.duration} after {self.warmup} of warm-up")
        return self


def anonymous_kb(pid: int) -> int:
    """Anonymous (heap, not file-backed) memory of a process, from ``/proc/<pid>/smaps_rollup``."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise ValueError(f"no Anonymous line in /proc/{pid}/smaps_rollup")


class MemorySampler:
    """Memory of a process and its children, sampled on a thread until stopped.

    Two figures per sample: the resident set, and its anonymous part. A leak grows the anonymous part;
    the rest of the resident set is file-backed (shared libraries, mapped weights), which the kernel drops
    and faults back in at will (this VM runs DAMON page-out), so it moves without the process doing
    anything. Growth is judged on anonymous memory; RSS is reported beside it.
    """

    def __init__(self, pid: int, every_s: float) -> None:
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, float, float]] = []  # (seconds since start, anonymous MB, RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-memory", daemon=True)
        self.started = time.monotonic()

    def memory_mb(self) -> tuple[float, float]:
        """(anonymous, resident) MB of the process tree."""
        anon = rss = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                rss += proc.memory_info().rss
                anon += anonymous_kb(proc.pid) * 1024
            except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                continue  # a child that just exited
        return anon / 2**20, rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.started, *self.memory_mb()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_trend(samples: list[tuple[float, float]], warmup_s: float, window_s: float, name: str) -> dict[str, Any]:
    """Floors at start and end, their growth, the median growth and the slope of the (seconds, MB) samples
    after warm-up, keys prefixed by name. A floor is the ``FLOOR_PERCENTILE``-th percentile of the samples in
    the first (last) ``window_s`` seconds after warm-up; see the module docstring for why."""
    kept = [(t, mb) for t, mb in samples if t >= warmup_s]
    if not kept:
        raise ValueError("no memory samples after warm-up (run longer)")
    times = np.array([t for t, _ in kept])
    mbs = np.array([mb for _, mb in kept])
    first, last = mbs[times < times[0] + window_s], mbs[times > times[-1] - window_s]
    if min(len(first), len(last)) < MIN_WINDOW_SAMPLES or times[-1] - times[0] < 2 * window_s:
        raise ValueError(
            f"only {len(kept)} memory samples over {times[-1] - times[0]:.0f} s after warm-up; need two windows of "
            f"{window_s:g} s with {MIN_WINDOW_SAMPLES} samples each (run longer or sample more often)"
        )
    start, end = float(np.percentile(first, FLOOR_PERCENTILE)), float(np.percentile(last, FLOOR_PERCENTILE))
    slope_per_s = float(np.polyfit(times, mbs, 1)[0])
    return {
        f"{name}_mb_start": round(start, 1),
        f"{name}_mb_end": round(end, 1),
        f"{name}_mb_max": round(float(mbs.max()), 1),
        f"{name}_growth_mb": round(end - start, 1),
        f"{name}_median_growth_mb": round(float(np.median(last) - np.median(first)), 1),
        f"{name}_slope_mb_per_min": round(slope_per_s * 60, 3),
    }


def run_soak(config: SoakBenchConfig, home: Path, json_path: Path, root: Path) -> list[dict[str, Any]]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness probe would log every poll
    slo = load_slo(config.slo)
    scenarios = load_scenarios(config.scenarios)
    log_path = json_path.with_suffix(".serve.log")
    with bentoml_serve(root, log_path, {"FTSERVE_HOME": str(home)}) as served:
        load = LoadtestConfig(
            host=served.url, grpc_target=served.grpc_target, users=config.users, spawn_rate=config.users,
            duration=config.duration, slo=config.slo, scenarios=config.scenarios,
        )  # fmt: skip
        base = preflight(load, scenarios)
        log.info("soak: %d users for %s against %s (server pid %d)", config.users, config.duration, served.url,
                 served.pid)  # fmt: skip
        with MemorySampler(served.pid, config.sample_every_s) as memory:
            duration, samples = run_locust(load, base)
    report = summarize(samples, RunInfo(served.url, config.users, config.users, duration), slo)
    warmup, window = parse_duration(config.warmup), parse_duration(config.window)
    trend = memory_trend([(t, anon) for t, anon, _ in memory.samples], warmup, window, "anon")
    trend |= memory_trend([(t, rss) for t, _, rss in memory.samples], warmup, window, "rss")
    steady = trend["anon_growth_mb"] > config.max_growth_mb
    keys = ("requests", "failures", "error_rate", "requests_per_s", "tokens_per_s", "p50_ttft_ms", "p95_ttft_ms",
            "p95_itl_ms", "p95_e2e_ms", "slo_ok")  # fmt: skip
    row = {"engine": "native", "scenario": "soak", "users": config.users, "duration_s": round(duration, 1),
           **{k: report[k] for k in keys}, **trend, "max_growth_mb": config.max_growth_mb, "steady_growth": steady,
           "errors": report["errors"]}  # fmt: skip
    rows = [row] + [{"engine": "native", "scenario": "soak-memory", "t_s": round(t, 1), "anon_mb": round(anon, 1),
                     "rss_mb": round(rss, 1)} for t, anon, rss in memory.samples]  # fmt: skip
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    log.info(
        "soak: %d requests, %d failed; anonymous memory floor %.0f -> %.0f MB after warm-up (%+.1f MB; median "
        "%+.1f MB, %+.2f MB/min; RSS floor %+.1f MB): %s",
        row["requests"], row["failures"], trend["anon_mb_start"], trend["anon_mb_end"], trend["anon_growth_mb"],
        trend["anon_median_growth_mb"], trend["anon_slope_mb_per_min"], trend["rss_growth_mb"],
        "GROWING" if steady else "no steady growth",
    )  # fmt: skip
    return rows
