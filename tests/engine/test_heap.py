"""The heap trimmer returns freed memory at most once per interval (glibc here)."""

from __future__ import annotations

from ftserve.engine.heap import HeapTrimmer


def test_trims_once_per_interval_on_glibc() -> None:
    now = [100.0]
    heap = HeapTrimmer(every_s=5.0, clock=lambda: now[0])
    heap.maybe_trim()
    assert heap.trims == 0  # not due yet
    now[0] = 105.0
    heap.maybe_trim()
    heap.maybe_trim()
    assert heap.trims == 1  # due once, then the interval starts again
    now[0] = 110.5
    heap.maybe_trim()
    assert heap.trims == 2
