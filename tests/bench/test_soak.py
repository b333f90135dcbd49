"""The soak benchmark's memory trend and settings (the 10-minute run itself is `make bench-extended`)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ftserve.bench.soak import MemorySampler, SoakBenchConfig, memory_trend


def test_flat_memory_after_warmup_shows_no_growth_even_if_warmup_grew() -> None:
    samples = [(float(t), 500.0 + t) for t in range(0, 60, 5)]  # warm-up: +55 MB
    samples += [(float(t), 560.0 + (1 if t % 10 else -1)) for t in range(60, 300, 5)]  # flat, +-1 MB
    trend = memory_trend(samples, warmup_s=60, window=4, name="anon")
    assert abs(trend["anon_growth_mb"]) <= 2 and abs(trend["anon_slope_mb_per_min"]) < 0.5
    assert trend["anon_mb_start"] == pytest.approx(560, abs=1)


def test_a_steady_leak_shows_as_growth_and_slope() -> None:
    samples = [(float(t), 800.0 + 0.5 * t) for t in range(0, 600, 5)]  # 30 MB/min
    trend = memory_trend(samples, warmup_s=120, window=6, name="rss")
    assert trend["rss_slope_mb_per_min"] == pytest.approx(30.0)
    assert trend["rss_growth_mb"] == pytest.approx(0.5 * (600 - 5 - 2.5 * 5) - 0.5 * (120 + 2.5 * 5))


def test_too_few_samples_after_warmup_are_refused() -> None:
    with pytest.raises(ValueError, match="memory samples after warm-up"):
        memory_trend([(0.0, 1.0), (10.0, 1.0), (20.0, 1.0)], warmup_s=5, window=2, name="anon")


def test_warmup_must_be_shorter_than_the_run() -> None:
    with pytest.raises(ValidationError, match="warmup"):
        SoakBenchConfig(duration="2m", warmup="5m")


def test_memory_is_read_for_a_process_tree_and_anonymous_memory_is_part_of_it() -> None:
    anon, rss = MemorySampler(os.getpid(), every_s=1.0).memory_mb()
    assert 0 < anon < rss
