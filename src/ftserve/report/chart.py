"""The cost chart: $/day against queries/day, log-log, self-hosted replica steps beside each API's line.

matplotlib is imported here only, when a chart is drawn, so the rest of the package does not need it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftserve.config import ConfigError
from ftserve.report.cost import CostReport, count, usd

GRID_POINTS = 400  # x samples between the ends, beside the exact replica step edges
MAX_STEP_EDGES = 5000  # past this many replica steps the grid alone draws them


def _x_points(report: CostReport) -> list[float]:
    """Queries/day from a decade under the smallest point of interest to one above the largest, plus each
    replica step edge n·C in that range (so ``steps-pre`` draws the ceil exactly)."""
    interest = [*report.queries_per_day]
    interest += [b.queries_per_day for b in report.break_evens() if b.queries_per_day is not None]
    lo, hi = min(interest) / 10, max(interest) * 10
    ratio = (hi / lo) ** (1 / (GRID_POINTS - 1))
    points = {lo * ratio**k for k in range(GRID_POINTS)}
    capacity = report.deployment.queries_per_day_per_replica
    first, last = math.ceil(lo / capacity), math.floor(hi / capacity)
    if last - first < MAX_STEP_EDGES:
        points.update(n * capacity for n in range(max(first, 1), last + 1))
    return sorted(points)


def _plain(text: str) -> str:
    """Text with its dollar signs escaped, so matplotlib does not read "$...$" as math."""
    return text.replace("$", r"\$")


def _new_figure() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--png needs matplotlib: pip install 'ftserve[loadtest]'") from None
    matplotlib.use("Agg")  # no display here; the chart only goes to a file
    from matplotlib.figure import Figure

    return Figure(figsize=(9, 6), dpi=110, layout="constrained")


def _mark_break_evens(ax: Any, report: CostReport) -> None:
    crossings: list[tuple[float, str]] = []
    for b in report.break_evens():
        if b.queries_per_day is not None:
            crossings.append((b.queries_per_day, b.api))
    for k, (q, api) in enumerate(sorted(crossings)):
        point = (q, report.deployment.usd_per_day(q))
        ax.plot(*point, "o", color="red", ms=7, zorder=3)
        # Stagger the labels downwards: the break-evens of close prices sit close together.
        ax.annotate(f"{api}: {count(q)}/day", point, textcoords="offset points", xytext=(6, -14 - 12 * k), fontsize=8)


def write_chart(report: CostReport, path: Path) -> None:
    """Draw the report's $/day curves and break-even points into a PNG at ``path``."""
    d = report.deployment
    fig = _new_figure()
    ax = fig.add_subplot()
    xs = _x_points(report)
    # steps-pre: the value at x_k holds on (x_{k-1}, x_k], which is ceil's interval.
    ax.plot(xs, [d.usd_per_day(x) for x in xs], drawstyle="steps-pre", lw=2.2, color="black", label="self-hosted")
    for name, api in report.apis.items():
        per_query = d.api_usd_per_query(api)
        if per_query > 0:
            ax.plot(xs, [x * per_query for x in xs], lw=1.5, label=_plain(f"{name} ({usd(per_query)}/query)"))
    _mark_break_evens(ax, report)
    for q in report.queries_per_day:
        ax.axvline(q, color="gray", lw=0.8, ls=":", zorder=0)  # the loads of the report's table
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queries/day")
    ax.set_ylabel(_plain("$/day"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(
        _plain(
            f"$/day vs queries/day: {d.hardware} at {usd(d.usd_per_hour)}/h, {d.tokens_per_s:,.1f} tokens/s measured, "
            f"utilization {d.utilization:g}"
        ),
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
