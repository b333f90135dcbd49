"""The soak benchmark's memory trend and settings (the 10-minute run itself is `make bench-extended`)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ftserve.bench.soak import MemorySampler, SoakBenchConfig, memory_trend


def test_flat_memory_after_warmup_shows_no_growth_even_if_warmup_grew() -> None:
    samples = [(float(t), 500.0 + t) for t in range(0, 60, 5)]  # warm-up: +55 MB
    samples += [(float(t), 560.0 + (1 if t % 10 else -1)) for t in range(60, 300, 5)]  # flat, +-1 MB
    trend = memory_trend(samples, warmup_s=60, window_s=30, name="anon")
    assert abs(trend["anon_growth_mb"]) <= 2 and abs(trend["anon_slope_mb_per_min"]) < 0.5
    assert trend["anon_mb_start"] == pytest.approx(559, abs=1)


def test_freed_memory_held_for_a_while_near_the_end_is_not_growth() -> None:
    """The allocator keeping freed pages for a minute lifts the median of the last window, not its floor."""
    samples = [(float(t), 4300.0 + (150.0 if 480 <= t < 600 and t % 15 else 0.0)) for t in range(0, 600, 5)]
    trend = memory_trend(samples, warmup_s=120, window_s=120, name="anon")
    assert trend["anon_median_growth_mb"] == pytest.approx(150)
    assert trend["anon_growth_mb"] == pytest.approx(0)


def test_a_steady_leak_shows_as_growth_of_the_floor_and_slope() -> None:
    samples = [(float(t), 800.0 + 0.5 * t) for t in range(0, 600, 5)]  # 30 MB/min
    trend = memory_trend(samples, warmup_s=120, window_s=60, name="rss")
    assert trend["rss_slope_mb_per_min"] == pytest.approx(30.0)
    # Each window holds 12 samples (60 s at 5 s); the floors sit at the same place in each, 480 - 60 s apart.
    assert trend["rss_growth_mb"] == pytest.approx(0.5 * (595 - 60 + 5 - 120))


def test_a_leak_under_swings_of_freed_memory_still_shows() -> None:
    swings = [0.0, 120.0, 40.0, 180.0, 10.0, 90.0]
    samples = [(float(t), 4300.0 + 0.2 * t + swings[t // 5 % 6]) for t in range(0, 600, 5)]  # 12 MB/min
    trend = memory_trend(samples, warmup_s=120, window_s=120, name="anon")
    assert trend["anon_growth_mb"] == pytest.approx(0.2 * 360, abs=10)


def test_too_few_samples_after_warmup_are_refused() -> None:
    with pytest.raises(ValueError, match="memory samples"):
        memory_trend([(0.0, 1.0), (10.0, 1.0), (20.0, 1.0)], warmup_s=5, window_s=10, name="anon")


def test_warmup_must_be_shorter_than_the_run() -> None:
    with pytest.raises(ValidationError, match="warmup"):
        SoakBenchConfig(duration="2m", warmup="5m")


def test_both_windows_must_fit_after_the_warmup() -> None:
    with pytest.raises(ValidationError, match="windows do not fit"):
        SoakBenchConfig(duration="5m", warmup="2m", window="2m")
    assert SoakBenchConfig(duration="6m", warmup="2m", window="2m").window == "2m"


def test_memory_is_read_for_a_process_tree_and_anonymous_memory_is_part_of_it() -> None:
    anon, rss = MemorySampler(os.getpid(), every_s=1.0).memory_mb()
    assert 0 < anon < rss
