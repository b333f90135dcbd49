"""How ``ftserve bench spec`` sums up its repeats (the runs themselves are `make bench`)."""

from __future__ import annotations

import pytest

from ftserve.bench.spec_bench import Run, paired_speedup


def _runs(rates: list[float]) -> list[Run]:
    return [Run(rate, rate, [[1, 2, 3]], 0, 0) for rate in rates]


def test_speedup_pairs_each_repeat_with_its_own_baseline() -> None:
    """The machine slowed down over the last repeats; each case ran as fast as its baseline in every
    repeat, bar one. Medians taken apart would compare one repeat's case with another's baseline (0.84x)."""
    none = _runs([10.84, 11.50, 10.83, 8.03, 8.94])
    case = _runs([11.21, 11.73, 8.80, 8.48, 9.09])
    assert paired_speedup(case, none) == pytest.approx(11.73 / 11.50)


def test_a_real_speedup_shows_in_every_pairing() -> None:
    none = _runs([20.0, 14.0, 17.0])
    case = _runs([40.0, 29.4, 35.7])
    assert paired_speedup(case, none) == pytest.approx(2.1)


def test_repeats_must_pair_up() -> None:
    with pytest.raises(ValueError):
        paired_speedup(_runs([1.0, 2.0]), _runs([1.0]))
