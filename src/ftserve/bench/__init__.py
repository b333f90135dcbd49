"""Benchmarks that measure engines side by side in one run and write JSON rows.

Every row is ``{"engine", "scenario", ...figures}``; the baseline runs in the same process on the same
workload, so a figure is read as a ratio against it, never as an absolute.
"""
