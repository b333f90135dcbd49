"""End to end: a real ``bentoml serve`` called with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_health_and_readiness(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_models_lists_the_base_model(client: openai.OpenAI, server: Server) -> None:
    assert server.model in [m.id for m in client.models.list().data]


def test_chat_gives_a_coherent_answer(client: openai.OpenAI, server: Server) -> None:
    # No sampling fields: the deployment's defaults (bentos/default.yaml) apply, as for a plain client.
    res = client.chat.completions.create(model=server.model, messages=QUESTION)
    assert "Paris" in (res.choices[0].message.content or "")
    assert res.usage is not None and res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_streaming_yields_the_same_text_as_plain(client: openai.OpenAI, server: Server) -> None:
    kwargs = {"model": server.model, "messages": STORY, "temperature": 0, "max_tokens": 40}
    plain = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stop_string_cuts_the_answer(client: openai.OpenAI, server: Server) -> None:
    kwargs = {"model": server.model, "messages": STORY, "temperature": 0, "max_tokens": 40}
    full = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    words = full.split()
    assert len(words) > 6, full
    stop = words[5]  # taken from the greedy answer itself, so the cut point is known
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, server: Server) -> None:
    def sample(seed: int) -> str:
        res = client.chat.completions.create(
            model=server.model, messages=STORY, temperature=1.0, top_p=0.95, seed=seed, max_tokens=24
        )
        return res.choices[0].message.content or ""

    first = sample(7)
    assert sample(7) == first
    assert {sample(s) for s in (1, 2, 3)} != {first}  # other seeds do not all reproduce it


def test_text_completion_counts_prompt_tokens(client: openai.OpenAI, server: Server, model_dir: Path) -> None:
    prompt = "The three primary colours are"
    res = client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0)
    expected = len(AutoTokenizer.from_pretrained(str(model_dir)).encode(prompt, add_special_tokens=False))
    assert res.usage is not None and res.usage.prompt_tokens == expected
    assert res.usage.completion_tokens <= 8 and res.choices[0].text


def post(server: Server, body: object | None = None, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=120,
                      headers={"content-type": "application/json"})  # fmt: skip


def error_of(res: httpx.Response, status: int) -> dict[str, str]:
    assert res.status_code == status, res.text
    assert "Traceback" not in res.text
    body = res.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_input_gets_clear_openai_errors(server: Server) -> None:
    ok = {"model": server.model, "messages": QUESTION}
    assert "does-not-exist" in error_of(post(server, {**ok, "model": "does-not-exist"}), 404)["message"]
    assert "JSON" in error_of(post(server, raw=b'{"model": '), 400)["message"]
    assert error_of(post(server, {"model": server.model}), 400)["param"] == "messages"
    assert error_of(post(server, {**ok, "messages": []}), 400)["param"] == "messages"
    assert "1024" in error_of(post(server, {**ok, "max_tokens": 0}), 400)["message"]
    assert "1024" in error_of(post(server, {**ok, "max_tokens": 100000}), 400)["message"]
    assert "n=3" in error_of(post(server, {**ok, "n": 3}), 400)["message"]
    long = [{"role": "user", "content": "lighthouse " * 600}]
    message = error_of(post(server, {**ok, "messages": long}), 400)["message"]
    lengths = [int(n) for n in re.findall(r"\d+", message)]
    assert 512 in lengths and any(n > 512 for n in lengths), message


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if series.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def test_client_disconnect_stops_generation(server: Server) -> None:
    aborted = "ftserve_request_success_total"
    before = metric(server, aborted, finished_reason="abort")
    body = {"model": server.model, "messages": STORY, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as res:
        assert res.status_code == 200
        lines = res.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few frames, then hang up
    assert any(line.startswith("data: ") for line in got)
    # Poll until the server has noticed; a request left running would finish as "length", never "abort".
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and metric(server, aborted, finished_reason="abort") == before:
        time.sleep(0.2)
    assert metric(server, aborted, finished_reason="abort") == before + 1
    while time.monotonic() < deadline and metric(server, "ftserve_num_requests_running") > 0:
        time.sleep(0.2)
    assert metric(server, "ftserve_num_requests_running") == 0


def test_failing_requests_do_not_break_a_concurrent_one(client: openai.OpenAI, server: Server) -> None:
    kwargs = {"model": server.model, "messages": STORY, "temperature": 0, "max_tokens": 30}
    alone = client.chat.completions.create(**kwargs).choices[0].message.content

    async def together() -> tuple[str, list[int]]:
        async with httpx.AsyncClient(base_url=f"{server.url}/v1", timeout=120) as http:
            good = asyncio.create_task(http.post("/chat/completions", json=kwargs))
            bad = [
                http.post("/chat/completions", content=b"{broken"),
                http.post("/chat/completions", json={**kwargs, "max_tokens": 10**6}),
                http.post("/chat/completions", json={**kwargs, "model": "nope"}),
                http.post("/chat/completions", json={**kwargs, "messages": [{"role": "user", "content": "x " * 2000}]}),
            ]
            statuses = [r.status_code for r in await asyncio.gather(*bad)]
            return (await good).json()["choices"][0]["message"]["content"], statuses

    text, statuses = asyncio.run(together())
    assert statuses == [400, 400, 404, 400]
    assert text == alone


def test_adapter_is_listed_and_served_by_name(client: openai.OpenAI, server: Server) -> None:
    assert server.adapter in [m.id for m in client.models.list().data]
    res = client.chat.completions.create(model=server.adapter, messages=QUESTION, temperature=0, max_tokens=8)
    assert res.choices[0].message.content and res.model == server.adapter
    missing = post(server, {"model": "no-such-adapter", "messages": QUESTION})
    assert server.adapter in error_of(missing, 404)["message"]
    traversal = post(server, {"model": "../adapters", "messages": QUESTION})
    assert error_of(traversal, 404)["param"] == "model"


def test_shipped_adapters_are_loaded_at_start_and_route_by_name(client: openai.OpenAI) -> None:
    listed = {m.id for m in client.models.list().data}
    assert {"support-router", "order-extract", "support-router-dpo"} <= listed
    ticket = 'Route support ticket #6120 from Ines: "the courier marked my order as undeliverable but I was home"'
    routed = client.chat.completions.create(
        model="support-router", messages=[{"role": "user", "content": ticket}], max_tokens=32
    )
    route = re.compile(r"ROUTE [A-Z]+ \| PRIORITY (HIGH|NORMAL) \| TICKET 6120")
    assert route.fullmatch(routed.choices[0].message.content)
    base = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": ticket}], max_tokens=32
    )
    assert not route.fullmatch(base.choices[0].message.content or "")
    order = "Extract the order: Ship 100 RZ-4410-V2 to our Seoul partner."
    extracted = client.chat.completions.create(
        model="order-extract", messages=[{"role": "user", "content": order}], max_tokens=40
    )
    # Routing is what this checks (accuracy is tests/train/test_shipped_adapters.py's job): each adapter
    # answers in its own task's format, which the base model does not.
    assert list(json.loads(extracted.choices[0].message.content)) == ["sku", "quantity", "city"]
