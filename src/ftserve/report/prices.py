"""The price table of the cost report: hosted-API token prices and hardware prices per hour.

Hardware prices default to :data:`ftserve.config.HARDWARE_USD_PER_HOUR` (the same table the service's cost
metric uses); a price file may override a row or add one, and must name at least one API offering.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ftserve.config import HARDWARE_USD_PER_HOUR, PROJECT_ROOT, ConfigError, load_yaml_config

DEFAULT_PRICES_FILE = PROJECT_ROOT / "loadtest" / "prices.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiPrice(_Strict):
    """One hosted-API offering, billed per token."""

    usd_per_1m_input: float = Field(ge=0, description="US dollars per 1M input (prompt) tokens.")
    usd_per_1m_output: float = Field(ge=0, description="US dollars per 1M output (generated) tokens.")
    note: str = Field("", description="What the row stands for (free text, shown in the report).")

    def usd_per_query(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.usd_per_1m_input + output_tokens * self.usd_per_1m_output) / 1e6


class PriceTable(_Strict):
    """Hardware $/hour rows (defaults from ``ftserve.config``, overridable) and API offerings by name."""

    hardware: dict[str, float] = Field(
        default_factory=dict,
        description="US dollars per hour by hardware name; overrides or extends ftserve.config's table.",
    )
    apis: dict[str, ApiPrice] = Field(min_length=1, description="Hosted-API offerings by name.")

    @model_validator(mode="after")
    def _positive_hardware(self) -> PriceTable:
        for name, price in self.hardware.items():
            if not price > 0:  # also refuses NaN
                raise ValueError(f"hardware {name!r}: usd per hour must be > 0, got {price}")
        return self

    def hardware_prices(self) -> dict[str, float]:
        """``ftserve.config``'s table with this file's rows laid over it."""
        return {**HARDWARE_USD_PER_HOUR, **self.hardware}

    def usd_per_hour(self, hardware: str) -> float:
        prices = self.hardware_prices()
        if hardware not in prices:
            raise ConfigError(f"unknown hardware {hardware!r}; known: {', '.join(prices)} (or give --usd-per-hour)")
        return prices[hardware]


def load_price_table(path: Path = DEFAULT_PRICES_FILE) -> PriceTable:
    """Read and validate a price file; every failure is a ConfigError naming the file."""
    return load_yaml_config(path, PriceTable, "price table")
