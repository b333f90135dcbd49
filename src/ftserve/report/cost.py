"""Self-hosting cost from measured throughput, against hosted APIs billed per token.

Inputs: ``T`` generated tokens/s measured on one replica, ``u`` the fraction of it a replica sustains in
production (utilization, (0, 1]), ``h`` the hardware's $/hour, and per query ``i`` input and ``o`` output
tokens. An API bills ``p_in`` and ``p_out`` dollars per 1M input and output tokens.

- Self-hosted $/1M output tokens = h / (T·u·3600) · 1e6. The throughput counts generated tokens, with
  the prompts' prefill inside the measured time, so this is the price of an output token with its prompt
  already paid for; $/1M total tokens spreads the same cost over i + o tokens per query.
- One replica serves ``C = T·u·86400 / o`` queries/day and costs ``D = 24·h`` dollars/day, busy or idle.
- Replicas at Q queries/day: ``n(Q) = max(1, ceil(Q / C))``; self-hosted $/day = n(Q)·D.
- Self-hosted marginal $/query (replicas full) = h / (T·u·3600) · o = D / C.
- API $/query ``a = (i·p_in + o·p_out) / 1e6``; API $/day = Q·a.
- Break-even: one replica costs D whatever the load, so it matches the API at ``Q1 = D / a``. When
  ``Q1 < C`` (that is ``a > D/C``: the API's price per query is above the self-hosted marginal cost),
  self-hosting is cheaper from Q1 on, except just after each added replica, on ``(n·C, (n+1)·D/a)`` while
  that window is not empty (``n < D / (a·C - D)``). When ``Q1 >= C`` no later replica step helps: at every
  ``Q = n·C`` self-hosting costs ``n·D = Q·D/C >= Q·a``, and between steps it costs more still, so
  self-hosting is never cheaper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ftserve.config import ConfigError
from ftserve.report.prices import ApiPrice

DEFAULT_OUTPUT_TOKENS_PER_QUERY = 150.0
DEFAULT_INPUT_TOKENS_PER_QUERY = 350.0
SECONDS_PER_DAY = 86_400
BENCH_ENGINE = "native"  # the engine whose bench rows count as "our" throughput
BENCH_KEYS = ("tokens_per_s", "output_tokens_per_s")  # the figure of a bench row, first key present wins
FORMS = (
    "expected the output of `ftserve loadtest --json` (an object with tokens_per_s) or of "
    "`ftserve bench engine --json` (a list of rows with engine, scenario and tokens_per_s)"
)


# -- throughput input --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """A measured throughput and what the measurement says about query sizes."""

    tokens_per_s: float  # generated tokens per second on one replica
    source: str  # where the figure came from, for the report
    output_tokens_per_query: float | None = None  # the measured mean, when the source has one
    input_tokens_per_query: float | None = None


def _number(value: Any, where: str, minimum: float = 0.0, strict: bool = True) -> float:
    """A finite JSON number above (``strict``) or at least ``minimum``, else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{where} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def read_throughput(path: Path) -> Throughput:
    """Throughput from a ``ftserve loadtest --json`` object or a ``ftserve bench engine --json`` row list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--from {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"--from {path}: not JSON ({exc}); {FORMS}") from None
    if isinstance(data, dict):
        return _loadtest_throughput(path, data)
    if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        return _bench_throughput(path, data)
    raise ConfigError(f"--from {path}: neither form; {FORMS}")


def _loadtest_throughput(path: Path, data: Mapping[str, Any]) -> Throughput:
    if "tokens_per_s" not in data:
        raise ConfigError(f"--from {path}: a JSON object without the key 'tokens_per_s'; {FORMS}")
    tokens_per_s = _number(data["tokens_per_s"], f"{path}: tokens_per_s")
    out = data.get("mean_completion_tokens")
    inp = data.get("mean_prompt_tokens")
    counts = ", ".join(f"{data[k]} {k}" for k in ("requests", "failures") if k in data)
    return Throughput(
        tokens_per_s=tokens_per_s,
        source=f"loadtest {path}" + (f" ({counts})" if counts else ""),
        output_tokens_per_query=None if out is None else _number(out, f"{path}: mean_completion_tokens"),
        input_tokens_per_query=None if inp is None else _number(inp, f"{path}: mean_prompt_tokens", strict=False),
    )


def _bench_throughput(path: Path, rows: Sequence[Mapping[str, Any]]) -> Throughput:
    """The fastest measured row of the native engine (rows an engine skipped carry no figures)."""
    for n, row in enumerate(rows):
        missing = [k for k in ("engine", "scenario") if k not in row]
        if missing:
            raise ConfigError(f"--from {path}: row {n} lacks {missing}; {FORMS}")
    ours = [row for row in rows if row["engine"] == BENCH_ENGINE and "skipped" not in row]
    if not ours:
        engines = sorted({str(row["engine"]) for row in rows})
        raise ConfigError(f"--from {path}: no measured row of engine {BENCH_ENGINE!r} (engines: {engines})")
    measured = [(_bench_figure(path, row), row) for row in ours]
    (value, key), row = max(measured, key=lambda m: m[0][0])
    return Throughput(value, f"bench {path}, row {BENCH_ENGINE}/{row['scenario']} ({key}, the highest)")


def _bench_figure(path: Path, row: Mapping[str, Any]) -> tuple[float, str]:
    key = next((k for k in BENCH_KEYS if k in row), None)
    if key is None:
        raise ConfigError(f"--from {path}: row {BENCH_ENGINE}/{row['scenario']} has none of the keys {BENCH_KEYS}")
    return _number(row[key], f"{path}: {key} of row {BENCH_ENGINE}/{row['scenario']}"), key


# -- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One replica's throughput and price, and the query it serves."""

    hardware: str
    usd_per_hour: float
    tokens_per_s: float  # measured generated tokens/s
    utilization: float  # fraction of tokens_per_s sustained in production
    input_tokens_per_query: float
    output_tokens_per_query: float
    source: str  # where tokens_per_s came from

    def __post_init__(self) -> None:
        _number(self.usd_per_hour, "usd per hour")
        _number(self.tokens_per_s, "tokens_per_s")
        _number(self.output_tokens_per_query, "output tokens per query")
        _number(self.input_tokens_per_query, "input tokens per query", strict=False)
        if not 0 < self.utilization <= 1:
            raise ConfigError(f"utilization must be in (0, 1], got {self.utilization}")

    @property
    def sustained_tokens_per_s(self) -> float:
        return self.tokens_per_s * self.utilization

    @property
    def usd_per_day_per_replica(self) -> float:
        return self.usd_per_hour * 24  # a replica is paid for all day, busy or idle

    @property
    def queries_per_day_per_replica(self) -> float:
        """C: the queries one replica answers in a day at the sustained rate."""
        return self.sustained_tokens_per_s * SECONDS_PER_DAY / self.output_tokens_per_query

    @property
    def usd_per_1m_output_tokens(self) -> float:
        return self.usd_per_hour / (self.sustained_tokens_per_s * 3600) * 1e6

    @property
    def usd_per_1m_total_tokens(self) -> float:
        """The same cost spread over input + output tokens."""
        return self.usd_per_query / (self.input_tokens_per_query + self.output_tokens_per_query) * 1e6

    @property
    def usd_per_query(self) -> float:
        """Marginal cost of a query with every replica full (D / C)."""
        return self.usd_per_1m_output_tokens * self.output_tokens_per_query / 1e6

    def replicas(self, queries_per_day: float) -> int:
        # At least one: an idle replica costs as much as a busy one.
        return max(1, math.ceil(queries_per_day / self.queries_per_day_per_replica))

    def usd_per_day(self, queries_per_day: float) -> float:
        return self.replicas(queries_per_day) * self.usd_per_day_per_replica

    def api_usd_per_query(self, api: ApiPrice) -> float:
        return api.usd_per_query(self.input_tokens_per_query, self.output_tokens_per_query)


MAX_WINDOWS = 3  # API-cheaper windows past the break-even listed one by one


@dataclass(frozen=True)
class BreakEven:
    """Where self-hosting starts to be cheaper than one API, and where the API wins again for a while."""

    api: str
    api_usd_per_query: float  # a
    one_replica_queries_per_day: float | None  # Q1 = D / a: one replica costs what the API does; None if a = 0
    queries_per_day: float | None  # Q1 when one replica can serve it (Q1 < C); None: self-hosting never cheaper
    # Past Q1, loads (n·C, (n+1)·D/a) where a freshly added replica is too idle to beat the API: the first
    # MAX_WINDOWS of them, and how many there are in all.
    api_cheaper_windows: tuple[tuple[float, float], ...] = ()
    api_cheaper_window_count: int = 0


def break_even(deployment: Deployment, name: str, api: ApiPrice) -> BreakEven:
    a = deployment.api_usd_per_query(api)
    if a == 0:
        return BreakEven(name, a, None, None)
    capacity, daily = deployment.queries_per_day_per_replica, deployment.usd_per_day_per_replica
    q1 = daily / a
    # Q1 < C <=> a > D/C, the self-hosted marginal cost; otherwise no replica step crosses (module docstring).
    # The relative margin keeps a == D/C (a tie at every full replica, never cheaper) out of float noise.
    if not q1 < capacity * (1 - 1e-9):
        return BreakEven(name, a, q1, None)
    # With n replicas full and one more added, the API is cheaper until a·Q reaches (n+1)·D; that window is
    # empty once n·C >= (n+1)·D/a, i.e. for n >= D / (a·C - D); the margin drops zero-width float windows.
    n_windows = math.ceil(daily / (a * capacity - daily) * (1 - 1e-9)) - 1
    windows = tuple((n * capacity, (n + 1) * daily / a) for n in range(1, min(n_windows, MAX_WINDOWS) + 1))
    return BreakEven(name, a, q1, q1, windows, n_windows)


@dataclass(frozen=True)
class CostReport:
    deployment: Deployment
    apis: Mapping[str, ApiPrice]
    queries_per_day: Sequence[float]
    price_source: str = ""  # where usd_per_hour came from, for the report
    api_source: str = ""  # where the API prices came from

    def break_evens(self) -> list[BreakEven]:
        return [break_even(self.deployment, name, api) for name, api in self.apis.items()]

    def rows(self) -> list[dict[str, Any]]:
        """One row per queries/day point: replicas and $/day self-hosted and per API."""
        rows = []
        for q in self.queries_per_day:
            apis = {name: q * self.deployment.api_usd_per_query(api) for name, api in self.apis.items()}
            costs = {"self-hosted": self.deployment.usd_per_day(q), **apis}
            rows.append(
                {
                    "queries_per_day": q,
                    "replicas": self.deployment.replicas(q),
                    "self_hosted_usd_per_day": costs["self-hosted"],
                    "api_usd_per_day": apis,
                    "cheapest": min(costs, key=costs.__getitem__),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        d = self.deployment
        return {
            "inputs": {**asdict(d), "price_source": self.price_source, "api_source": self.api_source},
            "self_hosted": {
                "usd_per_1m_output_tokens": d.usd_per_1m_output_tokens,
                "usd_per_1m_total_tokens": d.usd_per_1m_total_tokens,
                "usd_per_query": d.usd_per_query,
                "usd_per_day_per_replica": d.usd_per_day_per_replica,
                "queries_per_day_per_replica": d.queries_per_day_per_replica,
            },
            "apis": {name: api.model_dump() for name, api in self.apis.items()},
            "rows": self.rows(),
            "break_even": [asdict(b) for b in self.break_evens()],
        }


# -- markdown ----------------------------------------------------------------------------------------


def usd(value: float) -> str:
    """Dollars: cents from $1 up, else three significant digits (no exponent: it renders in tables)."""
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}".rstrip("0")
    return "$" + text + "0" * max(0, 2 - len(text.partition(".")[2]))


def count(value: float) -> str:
    return f"{value:,.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _inputs_section(report: CostReport) -> list[str]:
    d = report.deployment
    rows = [
        ("throughput", f"{d.tokens_per_s:,.2f} generated tokens/s ({d.source})"),
        ("hardware", f"{d.hardware} at {usd(d.usd_per_hour)}/hour ({report.price_source})"),
        ("utilization", f"{d.utilization:g}: one replica sustains {d.sustained_tokens_per_s:,.2f} tokens/s"),
        ("tokens per query", f"{d.input_tokens_per_query:g} input + {d.output_tokens_per_query:g} output"),
        ("one replica", f"{count(d.queries_per_day_per_replica)} queries/day for {usd(d.usd_per_day_per_replica)}/day"),
    ]
    return ["## Inputs", "", *_table(("input", "value"), rows)]


def _self_hosted_section(d: Deployment) -> list[str]:
    return [
        "## Self-hosted",
        "",
        f"- **{usd(d.usd_per_1m_output_tokens)} per 1M output tokens** (prompt processing included in the time)",
        f"- {usd(d.usd_per_1m_total_tokens)} per 1M total tokens (input + output, same cost spread over both)",
        f"- {usd(d.usd_per_query)} per query at the margin, with every replica full",
    ]


def _daily_section(report: CostReport) -> list[str]:
    names = list(report.apis)
    header = ("queries/day", "replicas", "self-hosted $/day", *(f"{n} $/day" for n in names), "cheapest")
    rows = [
        (
            count(r["queries_per_day"]),
            str(r["replicas"]),
            usd(r["self_hosted_usd_per_day"]),
            *(usd(r["api_usd_per_day"][n]) for n in names),
            r["cheapest"],
        )
        for r in report.rows()
    ]
    return ["## $/day by load", "", *_table(header, rows)]


def _verdict(b: BreakEven, d: Deployment) -> str:
    if b.one_replica_queries_per_day is None:
        return "the API is free at these prices: self-hosting is never cheaper"
    if b.queries_per_day is None:
        return (
            f"one replica would match the API at {count(b.one_replica_queries_per_day)} queries/day, beyond "
            f"its capacity of {count(d.queries_per_day_per_replica)}; the API's {usd(b.api_usd_per_query)}/query is "
            f"at most the self-hosted {usd(d.usd_per_query)}/query: self-hosting is never cheaper on this hardware"
        )
    if not b.api_cheaper_windows:
        return "self-hosting is cheaper at any load above it"
    spans = ", ".join(f"{count(lo)}–{count(hi)}" for lo, hi in b.api_cheaper_windows)
    more = b.api_cheaper_window_count - len(b.api_cheaper_windows)
    tail = f" and {more} more, each just after a replica is added" if more else ""
    return f"self-hosting is cheaper above it, except at {spans} queries/day{tail} (new replica too idle)"


def _break_even_section(report: CostReport) -> list[str]:
    d = report.deployment
    rows = []
    for b in report.break_evens():
        api = report.apis[b.api]
        q = "never" if b.queries_per_day is None else count(b.queries_per_day)
        prices = (usd(api.usd_per_1m_input), usd(api.usd_per_1m_output), usd(b.api_usd_per_query))
        rows.append((b.api, *prices, q, _verdict(b, d)))
    header = ("API", "$/1M input", "$/1M output", "$/query", "break-even queries/day", "verdict")
    source = f"API prices from {report.api_source}. " if report.api_source else ""
    note = f"{source}Break-even: the queries/day where one replica costs what the API does."
    return ["## Break-even", "", note, "", *_table(header, rows)]


METHOD = """## How this is computed

T = measured generated tokens/s, u = utilization, h = $/hour, i and o = input and output tokens per query,
an API bills p_in and p_out $ per 1M input and output tokens.

- self-hosted $/1M output tokens = h / (T·u·3600) · 1e6
- one replica serves C = T·u·86400 / o queries/day and costs D = 24·h $/day, busy or idle
- replicas at Q queries/day = max(1, ceil(Q / C)); self-hosted $/day = replicas · D
- API $/day = Q · (i·p_in + o·p_out) / 1e6 = Q · a
- break-even = D / a, where one replica costs what the API does; past it the API is cheaper again only on
  (n·C, (n+1)·D / a), just after the n+1-th replica is added; if D / a >= C, the API's a is at most the
  self-hosted marginal D / C and no number of replicas is ever cheaper

The throughput was measured with the source's prompt and completion lengths, and a load test measures the
load its users offered: for capacity, measure at saturation with queries like yours."""


def render_markdown(report: CostReport) -> str:
    sections = [
        ["# Cost: self-hosted vs API"],
        _inputs_section(report),
        _self_hosted_section(report.deployment),
        _daily_section(report),
        _break_even_section(report),
        [METHOD],
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
