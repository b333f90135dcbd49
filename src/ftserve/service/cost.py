"""Cost per adapter: what the hardware costs while the engine works, shared by the tokens each adapter used.

Every engine step reports its wall time and the tokens each adapter (or the base model) had in it. The
step's hardware cost (``usd_per_hour`` × seconds) is split among the adapters in proportion to those
tokens, so an adapter pays for the share of each batch it occupied, not for the whole batch and not by
request count; idle time is charged to nobody. Per-token prices, when configured, are added per request
for the tokens the engine processed (response-cache hits cost nothing).
"""

from __future__ import annotations

import logging

from ftserve.config import HARDWARE_USD_PER_HOUR, PricingConfig
from ftserve.engine.protocol import StepUsage
from ftserve.service import metrics

log = logging.getLogger(__name__)


def hardware_name(config: PricingConfig, device_name: str | None) -> str:
    """The price-table row: the configured one, or for ``auto`` the CUDA device's (``NVIDIA H200`` → h200)."""
    if config.hardware != "auto":
        return config.hardware
    if device_name:
        flat = device_name.lower().replace(" ", "-")
        matches = [row for row in HARDWARE_USD_PER_HOUR if row != "cpu" and row.split("-")[0] in flat]
        if matches:
            return max(matches, key=lambda row: ("80gb" in flat) == ("80gb" in row))
    return "cpu"


def usd_per_hour(config: PricingConfig, device_name: str | None) -> float:
    if config.usd_per_hour is not None:
        return config.usd_per_hour
    return HARDWARE_USD_PER_HOUR[hardware_name(config, device_name)]


class CostMeter:
    """Turns engine steps and finished requests into ``ftserve_cost_usd_total{adapter}``."""

    def __init__(self, config: PricingConfig, device_name: str | None = None) -> None:
        self.config = config
        self.usd_per_second = usd_per_hour(config, device_name) / 3600.0
        log.info(
            "cost: %s at $%.2f/h, $%g / $%g per 1K prompt / completion tokens",
            "custom" if config.usd_per_hour is not None else hardware_name(config, device_name),
            self.usd_per_second * 3600,
            config.usd_per_1k_prompt_tokens,
            config.usd_per_1k_completion_tokens,
        )

    def step_shares(self, step: StepUsage) -> dict[str, float]:
        """Seconds of the step charged to each adapter label (they sum to the step's time)."""
        total = sum(step.tokens.values())
        if total <= 0:
            return {}
        return {metrics.label(name): step.seconds * n / total for name, n in step.tokens.items() if n > 0}

    def observe_step(self, step: StepUsage) -> None:
        for adapter, seconds in self.step_shares(step).items():
            metrics.BUSY_SECONDS.labels(adapter=adapter).inc(seconds)
            metrics.COST_USD.labels(adapter=adapter).inc(seconds * self.usd_per_second)

    def token_cost(self, prompt_tokens: int, generated_tokens: int) -> float:
        return (
            prompt_tokens * self.config.usd_per_1k_prompt_tokens
            + generated_tokens * self.config.usd_per_1k_completion_tokens
        ) / 1000.0

    def observe_request(self, adapter: str, prompt_tokens: int, generated_tokens: int) -> None:
        metrics.COST_USD.labels(adapter=adapter).inc(self.token_cost(prompt_tokens, generated_tokens))
