"""Task generators: deterministic per seed, well-formed answers that match the prompt, wide variety."""

from __future__ import annotations

import json
import re

import pytest

from ftserve.train.pii import find_pii
from ftserve.train.tasks import get_task

ROUTE = re.compile(r"^ROUTE (BILLING|SHIPPING|TECHNICAL|ACCOUNT) \| PRIORITY (HIGH|NORMAL) \| TICKET (\d{4})$")
ROUTE_PROMPT = re.compile(r'^Route support ticket #(\d{4}) from [^:]+: "(.+)"$', re.S)


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="support-router"):
        get_task("nope")


@pytest.mark.parametrize("name", ["support-router", "order-extract"])
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    task = get_task(name)
    assert task.generate(50, seed=1) == task.generate(50, seed=1)
    assert task.generate(50, seed=1) != task.generate(50, seed=2)


@pytest.mark.parametrize("name", ["support-router", "order-extract"])
def test_messages_rarely_repeat_and_many_skeletons_are_used(name: str) -> None:
    items = get_task(name).generate(2000, seed=0)
    prompts = {i.prompt[0][1] for i in items}
    assert len(prompts) >= 0.99 * len(items)
    assert len({i.group for i in items}) >= 200


def test_support_router_answer_matches_its_prompt() -> None:
    items = get_task("support-router").generate(500, seed=0)
    seen = set()
    for item in items:
        answer = ROUTE.match(item.completion)
        prompt = ROUTE_PROMPT.match(item.prompt[0][1])
        assert answer and prompt, (item.prompt, item.completion)
        assert answer.group(3) == prompt.group(1)
        seen.add(answer.group(1, 2))
    assert len(seen) == 8  # every department with both priorities


def test_order_extract_answer_is_compact_json_whose_values_appear_in_the_message() -> None:
    for item in get_task("order-extract").generate(500, seed=0):
        text = item.prompt[0][1]
        assert text.startswith("Extract the order: ")
        obj = json.loads(item.completion)
        assert list(obj) == ["sku", "quantity", "city"]
        assert item.completion == json.dumps(obj)
        assert isinstance(obj["quantity"], int) and obj["quantity"] > 0
        assert obj["sku"] in text and obj["city"] in text


@pytest.mark.parametrize("name", ["support-router", "order-extract"])
def test_rejected_answers_are_wrong_but_well_formed(name: str) -> None:
    task = get_task(name)
    for pair in task.preferences(200, seed=0):
        assert pair.rejected != pair.chosen
        assert not task.score(pair.rejected, pair.chosen)
        if name == "support-router":
            assert ROUTE.match(pair.rejected)
        else:
            assert list(json.loads(pair.rejected)) == ["sku", "quantity", "city"]


def test_support_tickets_carry_some_pii_for_the_filters_to_redact() -> None:
    items = get_task("support-router").generate(1000, seed=0)
    kinds = {f.kind for i in items for f in find_pii(i.prompt[0][1])}
    assert {"EMAIL", "PHONE", "CARD"} <= kinds
