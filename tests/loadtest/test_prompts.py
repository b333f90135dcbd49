"""The request plan: weighted scenarios, joined context, and repeats that re-send an identical request."""

from __future__ import annotations

import random
from collections import Counter

from ftserve.client import GrpcClient, RestClient
from ftserve.loadtest.prompts import RequestPlan
from ftserve.loadtest.settings import PromptSource, Scenario, ScenarioFile


def plan(*scenarios: Scenario) -> RequestPlan:
    return RequestPlan(ScenarioFile(scenarios=list(scenarios)), base_model="served-base")


def scenario(name: str, **kw: object) -> Scenario:
    fields: dict[str, object] = {
        "name": name,
        "model": "base",
        "prompts": PromptSource(inline=[f"{name}-{i}" for i in range(50)]),
    }
    return Scenario.model_validate(fields | kw)


def test_scenarios_are_drawn_by_weight_and_the_base_model_goes_by_its_served_name() -> None:
    requests = plan(scenario("a", weight=3), scenario("b", model="support-router", weight=1))
    rng = random.Random(0)
    drawn = [requests.next(rng) for _ in range(4000)]
    counts = Counter(p.scenario for p in drawn)
    assert 0.70 < counts["a"] / len(drawn) < 0.80
    assert {p.ask.model for p in drawn if p.scenario == "a"} == {"served-base"}
    assert {p.adapter for p in drawn if p.scenario == "b"} == {"support-router"}


def test_context_joins_prompts_into_the_template() -> None:
    requests = plan(scenario("a", context=3, template="Summarize:\n{text}", max_tokens=7))
    ask = requests.next(random.Random(1)).ask
    assert ask.messages is not None and ask.max_tokens == 7
    content = ask.messages[0][1]
    assert content.startswith("Summarize:\n") and content.count("a-") == 3


def test_repeats_resend_an_identical_recent_request_at_about_their_rate() -> None:
    requests = plan(scenario("a", repeat=0.4))
    rng = random.Random(2)
    drawn = [requests.next(rng) for _ in range(2000)]
    repeats = [p for p in drawn if p.repeat]
    assert 0.33 < len(repeats) / len(drawn) < 0.47
    fresh = [p.ask for p in drawn if not p.repeat]
    assert all(any(p.ask is f for f in fresh) for p in repeats)  # a repeat is a request sent before, field for field


def test_no_repeat_is_drawn_when_the_rate_is_zero() -> None:
    requests = plan(scenario("a"))
    rng = random.Random(3)
    assert not any(requests.next(rng).repeat for _ in range(500))


def test_a_scenarios_speculation_settings_travel_with_its_requests_over_both_protocols() -> None:
    requests = plan(scenario("a", speculative={"drafter": "prompt-lookup", "num_tokens": 3}), scenario("b"))
    rng = random.Random(4)
    drawn = {p.scenario: p.ask for p in (requests.next(rng) for _ in range(50))}
    rest, grpc_client = RestClient("http://127.0.0.1:9"), GrpcClient("127.0.0.1:9")  # neither connects here
    try:
        assert rest.body(drawn["a"])["speculative"] == {"drafter": "prompt-lookup", "num_tokens": 3}
        assert "speculative" not in rest.body(drawn["b"])
        message = grpc_client.request(drawn["a"])
        assert message.speculation.drafter == "prompt-lookup" and message.speculation.num_tokens == 3
        assert not grpc_client.request(drawn["b"]).HasField("speculation")
    finally:
        rest.close()
        grpc_client.close()
