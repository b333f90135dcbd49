"""``ftserve cost``: the cost report from a measured throughput and a price table.

``add_cost_command(groups)`` adds the sub-command to ``ftserve``'s sub-parsers; its options and defaults
come from :class:`CostOptions`, and bad input raises ``ConfigError``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftserve.config import ConfigError
from ftserve.report.cost import (
    DEFAULT_INPUT_TOKENS_PER_QUERY,
    DEFAULT_OUTPUT_TOKENS_PER_QUERY,
    CostReport,
    Deployment,
    Throughput,
    read_throughput,
    render_markdown,
)
from ftserve.report.prices import DEFAULT_PRICES_FILE, load_price_table

log = logging.getLogger("ftserve")


class CostOptions(BaseModel):
    """What ``ftserve cost`` reads and writes; unset token counts come from the throughput file or defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_file: Path | None = Field(
        None, description="JSON from `ftserve loadtest --json` or `ftserve bench engine --json`."
    )
    tokens_per_s: float | None = Field(None, gt=0, description="Measured generated tokens/s, instead of --from.")
    output_tokens_per_query: float | None = Field(
        None,
        gt=0,
        description=f"Output tokens per query; default: the loadtest's mean, or {DEFAULT_OUTPUT_TOKENS_PER_QUERY:g}.",
    )
    input_tokens_per_query: float | None = Field(
        None,
        ge=0,
        description=f"Prompt tokens per query; default: the loadtest's mean, or {DEFAULT_INPUT_TOKENS_PER_QUERY:g}.",
    )
    hardware: str = Field("cpu", description="Row of the price table's hardware section (where T was measured).")
    usd_per_hour: float | None = Field(None, gt=0, description="Hardware $/hour; overrides the price table.")
    prices: Path = Field(DEFAULT_PRICES_FILE, description="Price table (YAML): API offerings, hardware overrides.")
    queries_per_day: list[Annotated[float, Field(gt=0)]] = Field(
        [1_000, 10_000, 100_000, 1_000_000], min_length=1, description="Loads the $/day table shows, comma-separated."
    )
    utilization: float = Field(
        0.6, gt=0, le=1, description="Fraction of the measured throughput one replica sustains in production."
    )
    markdown: Path | None = Field(None, description="Write the markdown report here (default: stdout).")
    png: Path | None = Field(None, description="Also draw the $/day chart into this PNG (needs matplotlib).")
    json_path: Path | None = Field(None, description="Also write the figures and rows as JSON here.")

    @model_validator(mode="after")
    def _one_throughput(self) -> CostOptions:
        if (self.from_file is None) == (self.tokens_per_s is None):
            raise ValueError("give exactly one of --from FILE and --tokens-per-s")
        return self


def _option(parser: Any, flag: str, name: str, **kwargs: Any) -> None:
    """An option whose help and default come from the CostOptions field ``name`` (unset = the model's)."""
    field = CostOptions.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in default)
    shown = "" if default is None else f" (default: {default})"
    parser.add_argument(flag, dest=name, default=None, help=f"{field.description}{shown}", **kwargs)


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def add_cost_command(groups: Any) -> None:
    """Add ``cost`` to an argparse sub-parsers object; it sets ``func`` to :func:`cmd_cost`."""
    cost = groups.add_parser("cost", help="$ per 1M tokens self-hosted and the break-even against APIs")
    source = cost.add_mutually_exclusive_group(required=True)
    _option(source, "--from", "from_file", type=Path, metavar="FILE")
    _option(source, "--tokens-per-s", "tokens_per_s", type=float, metavar="X")
    _option(cost, "--output-tokens-per-query", "output_tokens_per_query", type=float, metavar="N")
    _option(cost, "--input-tokens-per-query", "input_tokens_per_query", type=float, metavar="N")
    _option(cost, "--hardware", "hardware", metavar="NAME")
    _option(cost, "--usd-per-hour", "usd_per_hour", type=float, metavar="X")
    _option(cost, "--prices", "prices", type=Path, metavar="FILE")
    _option(cost, "--queries-per-day", "queries_per_day", type=_comma_list, metavar="Q,Q,...")
    _option(cost, "--utilization", "utilization", type=float, metavar="U")
    _option(cost, "--markdown", "markdown", type=Path, metavar="FILE")
    _option(cost, "--png", "png", type=Path, metavar="FILE")
    _option(cost, "--json", "json_path", type=Path, metavar="FILE")
    cost.set_defaults(func=cmd_cost)


def cost_options(ns: argparse.Namespace) -> CostOptions:
    given = {k: v for k in CostOptions.model_fields if (v := getattr(ns, k, None)) is not None}
    try:
        return CostOptions(**given)
    except ValidationError as exc:
        raise ConfigError(f"cost: {exc}") from None


def build_report(options: CostOptions) -> CostReport:
    """Resolve throughput, query size and prices (flag, then file, then default) into a report."""
    measured = _measured(options)
    table = load_price_table(options.prices)
    if options.usd_per_hour is not None:
        usd_per_hour, price_source = options.usd_per_hour, "--usd-per-hour"
    else:
        usd_per_hour, price_source = table.usd_per_hour(options.hardware), f"price table {options.prices}"
    deployment = Deployment(
        hardware=options.hardware,
        usd_per_hour=usd_per_hour,
        tokens_per_s=measured.tokens_per_s,
        utilization=options.utilization,
        input_tokens_per_query=_first(
            options.input_tokens_per_query, measured.input_tokens_per_query, DEFAULT_INPUT_TOKENS_PER_QUERY
        ),
        output_tokens_per_query=_first(
            options.output_tokens_per_query, measured.output_tokens_per_query, DEFAULT_OUTPUT_TOKENS_PER_QUERY
        ),
        source=measured.source,
    )
    queries = sorted(set(options.queries_per_day))
    return CostReport(deployment, table.apis, queries, price_source=price_source, api_source=str(options.prices))


def _measured(options: CostOptions) -> Throughput:
    if options.tokens_per_s is not None:
        return Throughput(options.tokens_per_s, "--tokens-per-s")
    if options.from_file is not None:
        return read_throughput(options.from_file)
    raise ConfigError("cost: give --from FILE or --tokens-per-s")


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def cmd_cost(ns: argparse.Namespace) -> int:
    options = cost_options(ns)
    report = build_report(options)
    markdown = render_markdown(report)
    if options.markdown is None:
        print(markdown, end="")
    else:
        _write_text(options.markdown, markdown)
    if options.json_path is not None:
        _write_text(options.json_path, json.dumps(report.to_json(), indent=2) + "\n")
    if options.png is not None:
        from ftserve.report.chart import write_chart  # matplotlib: only when a chart is asked for

        write_chart(report, options.png)
        log.info("wrote %s", options.png)
    return 0


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    log.info("wrote %s", path)
