"""Cost attribution: a step's hardware time is shared by the tokens each adapter had in it."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from ftserve.config import HARDWARE_USD_PER_HOUR, PricingConfig
from ftserve.engine.protocol import StepUsage
from ftserve.service import metrics
from ftserve.service.cost import CostMeter, hardware_name, usd_per_hour


def cost_of(adapter: str) -> float:
    return REGISTRY.get_sample_value("ftserve_cost_usd_total", {"adapter": adapter}) or 0.0


def test_step_time_is_split_by_token_share_and_sums_to_the_step() -> None:
    meter = CostMeter(PricingConfig(usd_per_hour=3.6))
    shares = meter.step_shares(StepUsage(0.5, {"a": 3, "b": 1, None: 0}))
    assert shares == pytest.approx({"a": 0.375, "b": 0.125})
    assert sum(shares.values()) == pytest.approx(0.5)
    assert meter.step_shares(StepUsage(0.5, {})) == {}


def test_observed_steps_add_dollars_per_adapter() -> None:
    meter = CostMeter(PricingConfig(usd_per_hour=3600.0))  # one dollar per second
    before = {a: cost_of(a) for a in ("cost-a", metrics.BASE)}
    meter.observe_step(StepUsage(2.0, {"cost-a": 1, None: 3}))
    after = {a: cost_of(a) for a in ("cost-a", metrics.BASE)}
    assert after["cost-a"] - before["cost-a"] == pytest.approx(0.5)
    assert after[metrics.BASE] - before[metrics.BASE] == pytest.approx(1.5)


def test_token_prices_add_per_request() -> None:
    meter = CostMeter(PricingConfig(usd_per_hour=0, usd_per_1k_prompt_tokens=0.5, usd_per_1k_completion_tokens=2))
    assert meter.token_cost(2000, 500) == pytest.approx(1.0 + 1.0)


@pytest.mark.parametrize(
    ("device", "row"),
    [(None, "cpu"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-PCIE-40GB",
     "a100-40gb"), ("NVIDIA L4", "l4"), ("Some New GPU", "cpu")],
)  # fmt: skip
def test_auto_hardware_follows_the_device_name(device: str | None, row: str) -> None:
    assert hardware_name(PricingConfig(), device) == row
    assert usd_per_hour(PricingConfig(), device) == HARDWARE_USD_PER_HOUR[row]


def test_configured_price_wins_and_unknown_hardware_is_refused() -> None:
    assert usd_per_hour(PricingConfig(hardware="a100-80gb", usd_per_hour=1.25), None) == 1.25
    assert usd_per_hour(PricingConfig(hardware="a100-80gb"), "NVIDIA H200") == 2.0
    with pytest.raises(ValidationError, match="unknown hardware 'tpu'"):
        PricingConfig(hardware="tpu")
