"""What a benchmark run measured, the figures a JSON row carries, and the side-by-side summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REQUIRED_FIGURES = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms")


@dataclass
class Measurement:
    """Raw timings of one scenario on one engine; all times in seconds."""

    output_tokens: int  # new tokens over all requests
    wall_s: float  # first submission to last token
    ttft_s: list[float]  # one per request: submission to its first token
    tpot_s: list[float]  # per-token decode times (per request, or per step for lock-step batches)


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation) in milliseconds; None for no values."""
    if not values:
        return None
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)) * 1000.0, 3)


def figures(m: Measurement) -> dict[str, Any]:
    return {
        "output_tokens": m.output_tokens,
        "wall_s": round(m.wall_s, 4),
        "output_tokens_per_s": round(m.output_tokens / m.wall_s, 3) if m.wall_s > 0 else None,
        "ttft_p50_ms": percentile_ms(m.ttft_s, 50),
        "ttft_p95_ms": percentile_ms(m.ttft_s, 95),
        "tpot_p50_ms": percentile_ms(m.tpot_s, 50),
        "tpot_p95_ms": percentile_ms(m.tpot_s, 95),
    }


def _get(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None or "skipped" in row else row.get(key)


def _cell(row: dict[str, Any] | None, key: str) -> str:
    if row is not None and "skipped" in row:
        return "skipped"
    value = _get(row, key)
    return "-" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def summary_table(rows: Sequence[dict[str, Any]], engine: str = "native", baseline: str = "hf-generate") -> str:
    """Plain-text table, one line per scenario: engine vs baseline figures and their ratios.

    Throughput ratio > 1 means the engine is faster; latency ratios < 1 mean the engine is faster.
    """
    by_key = {(r["engine"], r["scenario"]): r for r in rows}
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    head = ["scenario", f"{engine} tok/s", f"{baseline} tok/s", "tok/s ratio", "ttft p50 ratio", "tpot p50 ratio"]
    lines = [head]
    for name in scenarios:
        mine, base = by_key.get((engine, name)), by_key.get((baseline, name))
        lines.append(
            [
                name,
                _cell(mine, "output_tokens_per_s"),
                _cell(base, "output_tokens_per_s"),
                _ratio(_get(mine, "output_tokens_per_s"), _get(base, "output_tokens_per_s")),
                _ratio(_get(mine, "ttft_p50_ms"), _get(base, "ttft_p50_ms")),
                _ratio(_get(mine, "tpot_p50_ms"), _get(base, "tpot_p50_ms")),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(ln, widths, strict=True)))
        for ln in lines
    ]
    text.insert(1, "-" * len(text[0]))
    skipped = [f"  {r['engine']}/{r['scenario']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(text + (["skipped:", *skipped] if skipped else []))
